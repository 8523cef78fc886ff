"""Sources read through datasets.load_dataset (`hub`), with split selection, on a local dataset folder: no network."""

import json
import os
import re
import subprocess
import sys

import pytest

from finetune.data.cache import CACHE_ENV
from finetune.data.prepare import prepare_sft


@pytest.fixture
def dataset_folder(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "dataset"
    folder.mkdir()
    for split in ("train", "test"):
        with open(folder / f"{split}.jsonl", "w") as f:
            for i in range(10):
                f.write(json.dumps({"messages": [{"role": "user", "content": f"{split} question {i}"},
                                                 {"role": "assistant", "content": f"answer {i}"}]}) + "\n")
    return folder


def test_a_split_slice_of_a_load_dataset_source(dataset_folder, make_recipe, tokenizer):
    recipe = make_recipe(sft={"sources": [{"hub": str(dataset_folder), "split": "test[:4]"}]})
    prepared = prepare_sft(recipe, tokenizer)
    texts = sorted(tokenizer.decode(ids) for ids in prepared.train["input_ids"])
    assert texts == [f"<s> [INST] test question {i} [/INST] answer {i}</s>" for i in range(4)]
    assert prepared.stats["sources"][0]["name"] == f"{dataset_folder}[test[:4]]"
    assert prepare_sft(recipe, tokenizer).stats["cache"]["status"] == "hit"


def test_bad_rows_of_a_load_dataset_source_are_named_by_position(dataset_folder, make_recipe, tokenizer):
    with open(dataset_folder / "train.jsonl", "a") as f:
        f.write(json.dumps({"messages": [{"role": "user", "content": "no answer"}]}) + "\n")
    recipe = make_recipe(sft={"sources": [{"hub": str(dataset_folder)}]}, on_bad_row="drop")
    prepared = prepare_sft(recipe, tokenizer)
    assert prepared.stats["sources"][0]["dropped"] == {"wrong_turn_order": 1}
    assert prepared.stats["sources"][0]["first_dropped"].startswith(f"{dataset_folder}[train] row 11: wrong_turn")


@pytest.mark.parametrize("missing", ["dataset id", "local folder"])
def test_a_hub_source_that_cannot_be_loaded_is_one_error_naming_its_key(tmp_path, missing):
    # A child process, so that the offline settings are read when datasets is imported: no network is tried.
    hub = "someone/nonexistent" if missing == "dataset id" else str(tmp_path / "no-such-folder")
    (tmp_path / "rows.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "assistant", "content": "hello"}]}) + "\n")
    (tmp_path / "recipe.yaml").write_text(
        "output_dir: run\nmodel: {name_or_path: tiny-mixtral}\n"
        f"data: {{sft: {{sources: [{{path: rows.jsonl}}, {{hub: {hub}}}]}}}}\nstages: [{{type: sft}}]\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           CACHE_ENV: str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "finetune.cli", "data", "recipe.yaml", "--examples", "0"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    expected = rf"^error: data\.sft\.sources\.1\.hub: cannot load {re.escape(hub)}\[train\]: .*{re.escape(hub)}.*$"
    assert re.search(expected, done.stderr, re.M), done.stderr
