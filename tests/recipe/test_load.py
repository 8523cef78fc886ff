"""Recipe loading: every problem reported at once, with file, line and dotted key; overrides validated too."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from finetune.recipe import RecipeError, dump_recipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture(autouse=True)
def _in_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # data paths in recipes are relative to the working directory


def test_quickstart_is_valid_and_round_trips(tmp_path):
    recipe = load_recipe(QUICKSTART)
    assert [s.type for s in recipe.stages] == ["sft", "dpo"]
    again = load_recipe(write(tmp_path, dump_recipe(recipe)))
    assert again == recipe


def test_every_problem_named_with_line_and_key(tmp_path):
    path = write(tmp_path, """\
        seed: 1
        output_dir: runs/x
        model:
          name_or_path: tiny-mixtral
          quantisation: {quant_type: nf4}
        data:
          max_seq_len: many
          sft:
            sources:
              - path: nowhere.jsonl
        stages:
          - type: sft
            lerning_rate: 1.0e-3
          - type: dpo
            beta: -1
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    problems = info.value.problems
    assert f"{path}:5: model.quantisation: unknown key (did you mean 'quantization'?)" in problems
    assert any(p.startswith(f"{path}:7: data.max_seq_len:") for p in problems)
    assert any(p.startswith(f"{path}:10: data.sft.sources.0.path: no such file: nowhere.jsonl") for p in problems)
    assert f"{path}:13: stages.0.lerning_rate: unknown key (did you mean 'learning_rate'?)" in problems
    assert any(p.startswith(f"{path}:15: stages.1.beta:") for p in problems)
    assert len(problems) == 5


def test_missing_fields_and_impossible_combinations(tmp_path):
    path = write(tmp_path, """\
        output_dir: runs/x
        model:
          name_or_path: tiny-mixtral
        lora: null
        data:
          sft:
            sources: [{path: data/quickstart/sft.jsonl}]
        stages:
          - type: dpo
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    text = str(info.value)
    assert f"{path}:4: lora: required when model.quantization is set" in text
    assert f"{path}:8: stages: a 'dpo' stage needs data.dpo" in text


def test_stage_order_and_unknown_stage(tmp_path):
    base = textwrap.dedent("""\
        output_dir: runs/x
        model: {name_or_path: tiny-mixtral}
        data:
          sft: {sources: [{path: data/quickstart/sft.jsonl}]}
          dpo: {sources: [{path: data/quickstart/preference.jsonl}]}
        stages:
        """)
    with pytest.raises(RecipeError, match="sft must come first"):
        load_recipe(write(tmp_path, base + "  - type: dpo\n  - type: sft\n"))
    with pytest.raises(RecipeError, match=r":7: stages.0.type: expected 'sft', 'dpo', got 'ppo'$"):
        load_recipe(write(tmp_path, base + "  - type: ppo\n"))
    with pytest.raises(RecipeError, match=r"override 'stages.0.type=ppo': stages.0.type: expected 'sft', 'dpo'"):
        load_recipe(write(tmp_path, base + "  - type: sft\n"), ["stages.0.type=ppo"])


def test_overrides_apply_and_are_validated():
    recipe = load_recipe(QUICKSTART, ["stages.0.learning_rate=0.01", "lora.r=4", "seed=7"])
    assert recipe.stages[0].learning_rate == 0.01 and recipe.lora.r == 4 and recipe.seed == 7
    with pytest.raises(RecipeError) as info:
        load_recipe(QUICKSTART, ["lora.alfa=4", "stages.1.beta=zero"])
    assert "override 'lora.alfa=4': lora.alfa: unknown key (did you mean 'alpha'?)" in info.value.problems
    assert any(p.startswith("override 'stages.1.beta=zero': stages.1.beta:") for p in info.value.problems)
    with pytest.raises(RecipeError, match="stages.5 does not exist"):
        load_recipe(QUICKSTART, ["stages.5.beta=1"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    with pytest.raises(RecipeError, match=r"recipe.yaml:4: not valid YAML"):
        load_recipe(write(tmp_path, "seed: 1\nmodel:\n  name: x\n   bad: y\n"))


def test_validate_fails_before_any_model_library_is_imported(tmp_path):
    """A broken recipe must fail fast: the CLI exits 2 with the problem, never touching torch."""
    path = write(tmp_path, "seed: 1\noutput_dir: x\nmodle: {}\n")
    code = ("import sys; from finetune.cli import main; rc = main(['run', sys.argv[1]]); "
            "assert 'torch' not in sys.modules, 'torch was imported'; sys.exit(rc)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert f"{path}:3: modle: unknown key (did you mean 'model'?)" in done.stderr
    assert "model: required key is missing" in done.stderr


def write_one_sft_stage(tmp_path: Path, *stage_lines: str) -> Path:
    """A minimal recipe whose one SFT stage holds `stage_lines`, from line 7 of the file on."""
    head = """\
        output_dir: runs/x
        model: {name_or_path: tiny-mixtral}
        data:
          sft: {sources: [{path: data/quickstart/sft.jsonl}]}
        stages:
          - type: sft
        """
    return write(tmp_path, textwrap.dedent(head) + "".join(f"    {line}\n" for line in stage_lines))


def test_offloading_activations_needs_checkpointing(tmp_path):
    path = write_one_sft_stage(tmp_path, "gradient_checkpointing: false", "offload_activations: true")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:8: stages.0.offload_activations: needs gradient_checkpointing: true" in str(info.value)
    with_checkpointing = ["stages.0.gradient_checkpointing=true", "stages.0.offload_activations=true"]
    assert load_recipe(QUICKSTART, with_checkpointing).stages[0].offload_activations


def test_one_step_with_warmup_is_refused_since_it_trains_at_rate_zero(tmp_path):
    path = write_one_sft_stage(tmp_path, "max_steps: 1")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert (f"{path}:7: stages.0.max_steps: max_steps is 1, and with warmup_ratio 0.03 that one step trains at "
            "learning rate 0") in str(info.value)
    assert "Set warmup_ratio: 0 or lr_scheduler: constant" in str(info.value)
    for fixed in (["max_steps: 1", "warmup_ratio: 0"], ["max_steps: 1", "lr_scheduler: constant"], ["max_steps: 2"]):
        load_recipe(write_one_sft_stage(tmp_path, *fixed))


def test_an_unknown_stage_key_lists_only_that_stage_types_keys(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write_one_sft_stage(tmp_path, "zzz: 1"))
    hint = str(info.value).split("allowed here: ")[1]
    assert "learning_rate" in hint and "type" in hint
    assert "beta" not in hint and "loss_type" not in hint  # DPO's keys
    with pytest.raises(RecipeError, match=r"stages.1.zzz: unknown key; allowed here: .*\bbeta\b"):
        load_recipe(QUICKSTART, ["stages.1.zzz=1"])


def test_expert_chunks_are_a_positive_count_or_the_kernel_default(tmp_path):
    assert load_recipe(QUICKSTART).stages[0].expert_chunks is None
    assert load_recipe(QUICKSTART, ["stages.1.expert_chunks=4"]).stages[1].expert_chunks == 4
    path = write_one_sft_stage(tmp_path, "expert_chunks: 0")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{path}:7: stages.0.expert_chunks:" in str(info.value) and "greater than 0" in str(info.value)


def test_duplicate_keys_are_each_named_with_both_lines(tmp_path):
    """YAML keeps the last of two equal keys without a word: a second `lora:` block would replace the first."""
    path = write(tmp_path, """\
        output_dir: runs/x
        model: {name_or_path: tiny-mixtral}
        lora: {r: 16, r: 64}
        data:
          sft: {sources: [{path: data/quickstart/sft.jsonl}]}
        stages:
          - type: sft
            epochs: 1
            epochs: 2
        lora:
          dropout: 0.0
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [
        f"{path}:3: lora.r: duplicate key (first on line 3); YAML would keep only the last",
        f"{path}:9: stages.0.epochs: duplicate key (first on line 8); YAML would keep only the last",
        f"{path}:10: lora: duplicate key (first on line 3); YAML would keep only the last",
    ]


def test_merge_keys_may_be_overridden_without_a_duplicate(tmp_path):
    path = write(tmp_path, """\
        output_dir: runs/x
        model: &model {name_or_path: tiny-mixtral, device: cpu}
        data:
          sft: {sources: [{path: data/quickstart/sft.jsonl}]}
        stages:
          - type: sft
        export:
          <<: {dtype: float16, merge: false}
          dtype: float32
        """)
    recipe = load_recipe(path)
    assert recipe.export.dtype == "float32" and recipe.export.merge is False


@pytest.mark.parametrize("override", ["stages.0.epochs=.inf", "stages.0.learning_rate=.inf", "stages.1.beta=.inf",
                                      "stages.0.warmup_ratio=.nan", "data.sft.sources.0.weight=.inf",
                                      "lora.dropout=-.inf"])
def test_numbers_must_be_finite(override):
    """An infinite number of epochs validated, then crashed after the model had loaded."""
    with pytest.raises(RecipeError) as info:
        load_recipe(QUICKSTART, [override])
    key, value = override.split("=")
    assert info.value.problems == [f"override '{override}': {key}: must be a finite number, "
                                   f"got {float(value.replace('.', ''))}"]


def test_output_dir_is_a_folder_of_its_own(tmp_path, monkeypatch):
    """--overwrite deletes output_dir: it must never be the working, home or root folder."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    refused = {"": "is empty", "  ": "is empty", "/": "is the filesystem root", "~/": "is your home folder",
               str(home): "is your home folder", ".": "is the working directory",
               "..": "is a folder above the working directory"}
    for output_dir, reason in refused.items():
        override = f"output_dir={output_dir}" if output_dir.strip() else f"output_dir='{output_dir}'"
        with pytest.raises(RecipeError) as info:
            load_recipe(QUICKSTART, [override])
        [problem] = info.value.problems
        assert problem.startswith(f"override '{override}': output_dir: ") and reason in problem, problem
    assert load_recipe(QUICKSTART, ["output_dir=~/runs/x"]).output_dir == str(home / "runs" / "x")
    assert load_recipe(QUICKSTART, ["output_dir=runs/x"]).output_dir == "runs/x"


def test_a_local_looking_model_path_must_exist(tmp_path, monkeypatch):
    """A missing local folder was tried as a hub id, failing with a traceback after the run folder was written."""
    problems = {}
    for key, value in [("model.name_or_path", "/nonexistent/dir"), ("model.name_or_path", "./missing"),
                       ("model.tokenizer", "../missing"), ("model.tokenizer", "~/missing")]:
        with pytest.raises(RecipeError) as info:
            load_recipe(QUICKSTART, [f"{key}={value}"])
        [problems[value]] = info.value.problems
        assert problems[value].startswith(f"override '{key}={value}': {key}: no such folder: {value}")
    assert "relative paths are read from" in problems["./missing"]
    assert load_recipe(QUICKSTART, ["model.tokenizer=mistralai/Mixtral-8x7B-v0.1"]).model.tokenizer == \
        "mistralai/Mixtral-8x7B-v0.1"  # a hub id is looked up when the run starts
    assert load_recipe(QUICKSTART, [f"model.name_or_path={tmp_path}"]).model.name_or_path == str(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "base").mkdir()
    assert load_recipe(QUICKSTART, ["model.name_or_path=~/base"]).model.name_or_path == str(tmp_path / "base")


def test_run_with_a_missing_model_folder_writes_nothing(tmp_path):
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "-m", "finetune.cli", "run", str(QUICKSTART), f"output_dir={out}",
                           "model.name_or_path=/nonexistent/dir"], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2, done.stderr
    assert "model.name_or_path: no such folder: /nonexistent/dir" in done.stderr
    assert "Traceback" not in done.stderr and not out.exists()


def test_a_byte_that_is_not_utf8_names_its_line(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(b"seed: 1\noutput_dir: runs/x\nmodel: {name_or_path: caf\xe9}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [f"{path}:3: not UTF-8 text: byte 0xe9 at column 26 (save the recipe as UTF-8)"]


def test_a_key_yaml_reads_as_a_boolean_is_named_with_the_fix(tmp_path):
    path = write(tmp_path, """\
        output_dir: runs/x
        model: {name_or_path: tiny-mixtral}
        data:
          sft: {sources: [{path: data/quickstart/sft.jsonl}]}
        stages:
          - type: sft
        tracking:
          on: true
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [
        f"{path}:8: tracking.on: YAML reads the key 'on' as the boolean true, not a word: quote it ('on':)"]


def test_an_empty_section_is_named_not_taken_for_the_defaults(tmp_path):
    """`lora: null` means no LoRA, so a section left empty is an error rather than a guess."""
    path = write(tmp_path, """\
        output_dir: runs/x
        model:
        data:
          sft: {sources: [{path: data/quickstart/sft.jsonl}]}
        stages:
          - type: sft
          -
        export:
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    empty = "the section is empty (YAML reads a key with nothing under it as null): give its keys"
    assert info.value.problems == [
        f"{path}:2: model: {empty}",
        f"{path}:7: stages.1: the item is empty: give its keys",
        f"{path}:8: export: {empty}, or leave the key out for the defaults",
    ]


def test_booleans_are_true_or_false_only(tmp_path):
    path = write_one_sft_stage(tmp_path, 'gradient_checkpointing: "no"')
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [f"{path}:7: stages.0.gradient_checkpointing: expected true or false, got 'no'"]
    with pytest.raises(RecipeError, match=r"export.merge: expected true or false, got 'off'"):
        load_recipe(QUICKSTART, ["export.merge='off'"])
    with pytest.raises(RecipeError, match=r"data.sft.packing: expected true or false, got 1"):
        load_recipe(QUICKSTART, ["data.sft.packing=1"])
    assert load_recipe(QUICKSTART, ["export.merge=false"]).export.merge is False


def test_key_problems_in_the_file_do_not_hide_an_overrides_key_problem(tmp_path):
    """A duplicate key once hid every "key is not a string" error, an override's included."""
    path = write(tmp_path, """\
        output_dir: runs/x
        model: {name_or_path: tiny-mixtral}
        lora: {r: 16, r: 64}
        data:
          sft: {sources: [{path: data/quickstart/sft.jsonl}]}
        stages:
          - type: sft
        export:
          1: x
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["lora.1=4"])
    problems = info.value.problems
    assert problems[:2] == [
        f"{path}:3: lora.r: duplicate key (first on line 3); YAML would keep only the last",
        f"{path}:9: export.1: YAML reads the key '1' as a number, not a word: quote it ('1':)",
    ]
    assert len(problems) == 3 and problems[2].startswith("override 'lora.1=4': lora.1: unknown key; allowed here: ")


def test_a_merged_anchor_names_each_problem_once_where_the_key_is_written(tmp_path):
    path = write(tmp_path, """\
        output_dir: runs/x
        model: &model
          name_or_path: tiny-mixtral
          on: cpu
        data:
          sft: {sources: [{path: data/quickstart/sft.jsonl}]}
        stages:
          - type: sft
        export:
          <<: *model
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    allowed = "allowed here: base, dtype, max_shard_size, merge, verify_tolerance"
    assert info.value.problems == [  # the key `on:` is written once, so it is named once
        f"{path}:4: model.on: YAML reads the key 'on' as the boolean true, not a word: quote it ('on':)",
        f"{path}:3: export.name_or_path: unknown key; {allowed}",
    ]


def test_a_stage_anchor_merged_twice_names_its_unknown_key_per_stage_at_its_line(tmp_path):
    path = write(tmp_path, """\
        output_dir: runs/x
        model: {name_or_path: tiny-mixtral}
        data:
          sft: {sources: [{path: data/quickstart/sft.jsonl}]}
          dpo: {sources: [{path: data/quickstart/preference.jsonl}]}
        stages:
          - type: sft
            <<: &training
              epochz: 1
          - type: dpo
            <<: *training
        """)
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [f"{path}:9: stages.0.epochz: unknown key (did you mean 'epochs'?)",
                                   f"{path}:9: stages.1.epochz: unknown key (did you mean 'epochs'?)"]
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["stages.1.epochz=2"])
    assert info.value.problems[1] == "override 'stages.1.epochz=2': stages.1.epochz: unknown key (did you mean 'epochs'?)"


def test_an_override_changes_one_use_of_an_alias_only(tmp_path):
    """An alias shares its anchor's object: an override of source 0 also changed source 1, and blamed the file."""
    path = write(tmp_path, """\
        output_dir: runs/x
        model: {name_or_path: tiny-mixtral}
        data:
          sft:
            sources:
              - &source {path: data/quickstart/sft.jsonl}
              - *source
        stages:
          - type: sft
        """)
    recipe = load_recipe(path, ["data.sft.sources.0.weight=3"])
    assert [s.weight for s in recipe.data.sft.sources] == [3.0, 1.0]
    with pytest.raises(RecipeError) as info:
        load_recipe(path, ["data.sft.sources.0.weight=-1"])
    [problem] = info.value.problems
    assert problem.startswith("override 'data.sft.sources.0.weight=-1': data.sft.sources.0.weight:")


@pytest.mark.parametrize("text, problem", [
    ("", "1: the recipe is empty: give its keys"),
    ("# nothing yet\n", "1: the recipe is empty: give its keys"),
    ("- seed\n- model\n", "1: a recipe is a mapping of keys, got list"),
    ("seed\n", "1: a recipe is a mapping of keys, got str"),
    ("seed: 1\nmodel:\n\tname_or_path: x\n", "3: not valid YAML: found character '\\t' that cannot start any token"),
    ("stages: &stages [*stages]\n", "1: stages: an alias at stages.0 repeats this inside itself, which never ends"),
    ("seed: 1\nexport: &export\n  base: {<<: *export}\n",
     "2: export: an alias at export.base repeats this inside itself, which never ends"),
    ("seed: " + "[" * 2000 + "]" * 2000 + "\n", "1: nested too deeply to read"),
    # each alias repeats its anchor's nesting: deeper than the parser itself ever goes
    ("junk:\n  a: &a " + "[" * 300 + "x" + "]" * 300 + "\n  b: " + "[" * 300 + "*a" + "]" * 300 + "\n",
     "4: nested too deeply to read"),
    ("seed: 1\x07\n", "1: not valid YAML: control character #x0007 (YAML allows no such character)"),
])
def test_malformed_yaml_is_one_named_problem_not_a_traceback(tmp_path, text, problem):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    done = subprocess.run([sys.executable, "-m", "finetune.cli", "validate", str(path)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[1:] == [f"  - {path}:{problem}"]


def test_a_merged_key_is_named_at_the_line_of_the_value_yaml_kept(tmp_path):
    path = write(tmp_path, """\
        output_dir: runs/x
        model: {name_or_path: tiny-mixtral}
        data:
          sft:
            sources:
              - &first {path: data/quickstart/sft.jsonl,
                        weight: -1}
              - &second {path: data/quickstart/sft.jsonl,
                         weight: -2}
              - {<<: [*first, *second]}
        stages:
          - type: sft
        """)
    import yaml

    kept = yaml.safe_load(path.read_text())["data"]["sft"]["sources"][2]["weight"]  # the installed PyYAML's choice
    line = {-1: 7, -2: 9}[kept]
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert any(p.startswith(f"{path}:{line}: data.sft.sources.2.weight:") for p in info.value.problems), info.value


def test_an_override_that_adds_a_section_is_named_for_it():
    with pytest.raises(RecipeError) as info:
        load_recipe(QUICKSTART, ["lorra.r=8", "export.merge=false"])
    assert info.value.problems == ["override 'lorra.r=8': lorra: unknown key (did you mean 'lora'?)"]
    with pytest.raises(RecipeError, match="override 'lora.\u00b2=8': lora.\u00b2: unknown key"):
        load_recipe(QUICKSTART, ["lora.\u00b2=8"])  # a digit to str.isdigit, not a list index


def test_a_key_of_the_other_stage_type_says_which_stage_has_it(tmp_path):
    with pytest.raises(RecipeError) as info:
        load_recipe(write_one_sft_stage(tmp_path, "loss_type: ipo"))
    assert str(info.value).endswith("stages.0.loss_type: unknown key for an sft stage (only a dpo stage has it)")
