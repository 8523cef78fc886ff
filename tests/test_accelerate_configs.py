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
