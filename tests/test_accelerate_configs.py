"""Every shipped accelerate config parses with accelerate's own loader."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "accelerate_configs").rglob("*.yaml"))


def test_found_configs():
    assert {p.name for p in CONFIGS} >= {"cpu.yaml", "cpu_ddp.yaml", "single_gpu.yaml", "multi_gpu.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_loads(path):
    config = load_config_from_file(str(path))
    assert config.num_processes >= 1


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_says_how_to_launch_it(path):
    """Each config's header comment gives the command that uses it, with the module this project runs as."""
    header = "\n".join(line for line in path.read_text().splitlines() if line.startswith("#"))
    assert f"--config_file accelerate_configs/{path.name}" in header and "-m finetune run RECIPE" in header


def launch_environment(path: Path) -> dict[str, str]:
    """What `accelerate launch --config_file PATH` puts in its processes' environment, by accelerate's own code
    (the steps of its `launch_command`, short of starting anything)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(path), "-m", "finetune", "run", "RECIPE"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        return prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return prepare_multi_gpu_env(args)
    return {}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_config_passes_the_launch_checks(path):
    """Every shipped config is one finetune accepts, as accelerate passes it on."""
    from finetune.distributed import refuse_unsupported_launch

    env = launch_environment(path)
    refuse_unsupported_launch(env)
    if path.name in ("cpu_zero3.yaml", "zero3_qlora.yaml"):
        assert env["ACCELERATE_USE_DEEPSPEED"] == "true"
        assert env["ACCELERATE_DEEPSPEED_MOE_LAYER_CLS_NAMES"] == "MixtralSparseMoeBlock"


@pytest.mark.parametrize("key, named", [("zero3_init_flag", r"zero3_init_flag is unset \(on for stage 3\)"),
                                        ("deepspeed_moe_layer_cls_names", r"deepspeed_moe_layer_cls_names is unset")])
def test_a_zero3_config_missing_a_key_is_refused(tmp_path, key, named):
    """A key left out of the yaml takes accelerate's default, which for these two is not what finetune needs."""
    import yaml

    from finetune.distributed import refuse_unsupported_launch
    from finetune.errors import FinetuneError

    config = yaml.safe_load((REPO / "accelerate_configs" / "zero3_qlora.yaml").read_text())
    del config["deepspeed_config"][key]
    path = tmp_path / "zero3.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(FinetuneError, match=named):
        refuse_unsupported_launch(launch_environment(path))
