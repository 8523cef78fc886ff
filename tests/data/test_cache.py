"""The preprocessing cache: a hit for the same inputs, a miss when a file, a setting, the seed or the tokenizer
changes, entries written whole or not at all, in $FINETUNE_CACHE."""

import json

import pytest

from finetune.data import cache
from finetune.data.prepare import prepare_dpo, prepare_sft


@pytest.fixture
def sft_file(write_jsonl, chat):
    return write_jsonl("chat.jsonl", [chat(i) for i in range(30)])


def with_data(recipe, **changes):
    return recipe.model_copy(update={"data": recipe.data.model_copy(update=changes)})


def test_second_prepare_is_a_hit_with_the_same_rows(sft_file, make_recipe, tokenizer, cache_dir):
    recipe = make_recipe(sft={"sources": [{"path": sft_file}], "eval_fraction": 0.1})
    first = prepare_sft(recipe, tokenizer)
    second = prepare_sft(recipe, tokenizer)
    assert (first.stats["cache"]["status"], second.stats["cache"]["status"]) == ("miss", "hit")
    assert first.fingerprint == second.fingerprint
    assert second.train.to_list() == first.train.to_list() and second.eval.to_list() == first.eval.to_list()
    assert second.summary().splitlines()[1:] == first.summary().splitlines()[1:]
    assert second.manifest() == {**first.manifest(), "cache": "hit"}
    entry = cache_dir / "data" / first.fingerprint
    assert second.stats["cache"]["path"] == str(entry) and (entry / "stats.json").is_file()
    assert [p.name for p in (cache_dir / "data").iterdir()] == [first.fingerprint]  # no staging folder left


def test_changing_a_file_a_setting_the_seed_or_the_tokenizer_misses(sft_file, make_recipe, tokenizer, chat):
    recipe = make_recipe(sft={"sources": [{"path": sft_file}]})
    key = prepare_sft(recipe, tokenizer).fingerprint

    changed = [
        make_recipe(sft={"sources": [{"path": sft_file}]}, max_seq_len=1024),
        make_recipe(sft={"sources": [{"path": sft_file}]}, train_on_prompt=True),
        make_recipe(sft={"sources": [{"path": sft_file}], "packing": True}),
        make_recipe(sft={"sources": [{"path": sft_file, "weight": 2.0}]}),
        make_recipe(sft={"sources": [{"path": sft_file}]}, seed=1),
    ]
    keys = {prepare_sft(r, tokenizer).fingerprint for r in changed}
    assert len(keys) == len(changed) and key not in keys

    other_tokenizer = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, bos_token="<s>",
                                          eos_token="</s>", unk_token="<unk>", pad_token="</s>",
                                          chat_template=tokenizer.chat_template)
    assert prepare_sft(recipe, other_tokenizer).stats["cache"]["status"] == "miss"

    with open(sft_file, "a") as f:
        f.write(json.dumps(chat(99)) + "\n")
    after = prepare_sft(recipe, tokenizer)
    assert after.stats["cache"]["status"] == "miss" and after.fingerprint != key and len(after.train) == 31


def test_settings_that_change_nothing_share_the_entry(sft_file, write_jsonl, make_recipe, tokenizer, preference):
    prefs = write_jsonl("prefs.jsonl", [preference(i) for i in range(10)])
    recipe = make_recipe(sft={"sources": [{"path": sft_file}]}, dpo={"sources": [{"path": prefs}]})
    prepare_sft(recipe, tokenizer)
    dpo_key = prepare_dpo(recipe, tokenizer).fingerprint
    assert prepare_sft(with_data(recipe, num_proc=2), tokenizer).stats["cache"]["status"] == "hit"
    bigger_batches = make_recipe(sft={"sources": [{"path": sft_file}]}, dpo={"sources": [{"path": prefs}]},
                                 stages=[{"type": "sft", "batch_size": 16}, {"type": "dpo"}])
    hit = prepare_sft(bigger_batches, tokenizer)
    assert hit.stats["cache"]["status"] == "hit" and hit.stats["padded_batches"]["batch_size"] == 16
    # the DPO data does not depend on the SFT data or on train_on_prompt
    other = make_recipe(sft={"sources": [{"path": sft_file, "weight": 0.5}]}, dpo={"sources": [{"path": prefs}]},
                        train_on_prompt=True)
    assert prepare_dpo(other, tokenizer).fingerprint == dpo_key


def test_cache_off_writes_nothing(sft_file, make_recipe, tokenizer, cache_dir):
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": sft_file}]}, cache=False), tokenizer)
    assert prepared.stats["cache"]["status"] == "off" and not cache_dir.exists()


def test_an_interrupted_write_leaves_no_entry(sft_file, make_recipe, tokenizer, cache_dir, monkeypatch):
    from datasets import Dataset

    recipe = make_recipe(sft={"sources": [{"path": sft_file}], "eval_fraction": 0.2})
    real_save = Dataset.save_to_disk
    calls = []

    def save_then_fail(self, path, **kwargs):
        real_save(self, path, **kwargs)
        calls.append(path)
        if len(calls) == 2:  # train is written, eval is written, then the process "dies"
            raise KeyboardInterrupt

    monkeypatch.setattr(Dataset, "save_to_disk", save_then_fail)
    with pytest.raises(KeyboardInterrupt):
        prepare_sft(recipe, tokenizer)
    assert list((cache_dir / "data").iterdir()) == []
    monkeypatch.setattr(Dataset, "save_to_disk", real_save)
    assert prepare_sft(recipe, tokenizer).stats["cache"]["status"] == "miss"
    assert prepare_sft(recipe, tokenizer).stats["cache"]["status"] == "hit"


def test_a_racing_writer_keeps_the_first_entry(sft_file, make_recipe, tokenizer):
    recipe = make_recipe(sft={"sources": [{"path": sft_file}]})
    prepared = prepare_sft(recipe, tokenizer)
    path = cache.save(prepared.fingerprint, prepared.train, None, {"stage": "sft", "marker": "second writer"})
    assert "marker" not in json.loads((path / "stats.json").read_text())


def test_cache_root_defaults_to_the_user_cache(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache.cache_root() == tmp_path / ".cache" / "finetune"
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache.cache_root() == tmp_path / "elsewhere"
