"""Sources read through datasets.load_dataset (`hub`), with split selection, on a local dataset folder: no network."""

import json

import pytest

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
