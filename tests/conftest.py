"""Fixtures for the whole suite."""

from pathlib import Path

import pytest
import yaml

from finetune.data.cache import CACHE_ENV

QUICKSTART_DATA = Path(__file__).resolve().parents[1] / "data" / "quickstart"
STAGE_DEFAULTS = {"batch_size": 2, "logging_steps": 1, "save_steps": 100, "gradient_checkpointing": False}


@pytest.fixture(scope="session", autouse=True)
def private_data_cache(tmp_path_factory):
    """Prepared data goes to a folder of this test session, never the user's cache; child runs inherit it."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(CACHE_ENV, str(tmp_path_factory.mktemp("finetune-cache")))
        yield


def tiny_recipe_text(*, sft: dict | None = None, dpo: dict | None = None, lora: dict | None = None,
                     data: dict | None = None, **sections) -> str:
    """A short recipe on the tiny Mixtral and the quickstart data: no export, no dashboards.

    `sft` and `dpo` are the settings of that stage (a stage left None is left out, with its data); `lora` and
    `data` update those sections (a stage's data too); any other keyword replaces a top-level section (`seed=5`,
    `export={...}`; None leaves it out, to its default).
    """
    recipe = {"seed": 7, "output_dir": "unset",
              "model": {"name_or_path": "tiny-mixtral", "compute_dtype": "float32", "device": "cpu"},
              "lora": {"r": 8, "alpha": 16, "dropout": 0.0, **(lora or {})},
              "data": {"max_seq_len": 256}, "stages": [],
              "export": {"merge": False}, "tracking": {"report_to": ["none"]}}
    for kind, settings, rate, file in (("sft", sft, 1.0e-2, "sft.jsonl"), ("dpo", dpo, 1.0e-3, "preference.jsonl")):
        if settings is not None:
            recipe["stages"].append({"type": kind, "learning_rate": rate, **STAGE_DEFAULTS, **settings})
            recipe["data"][kind] = {"sources": [{"path": str(QUICKSTART_DATA / file)}]}
    for key, value in (data or {}).items():  # a stage's data is updated, not replaced: data={"sft": {"eval_fraction": .1}}
        known = recipe["data"].get(key)
        recipe["data"][key] = {**known, **value} if isinstance(known, dict) and isinstance(value, dict) else value
    recipe.update(sections)
    return yaml.safe_dump({key: value for key, value in recipe.items() if value is not None}, sort_keys=False)


@pytest.fixture(scope="session")
def tiny_recipe():
    """`tiny_recipe(path, **settings)` writes `tiny_recipe_text(**settings)` to `path` and returns the path."""
    def write(path: Path, **settings) -> Path:
        path.write_text(tiny_recipe_text(**settings), encoding="utf-8")
        return path

    return write
