"""prepare_sft / prepare_dpo on the quickstart data: rows ready for trl, masks on assistant tokens only, workers."""

import json
from pathlib import Path

import pytest

from finetune.data.chat import tokenize_conversation
from finetune.data.prepare import prepare_dpo, prepare_sft
from finetune.data.report import CLOSE, OPEN, render_trained
from finetune.recipe import load_recipe

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def quickstart(monkeypatch):
    monkeypatch.chdir(REPO)
    return load_recipe(REPO / "recipes" / "quickstart.yaml")


def test_sft_rows_are_the_conversations_with_assistant_masks(quickstart, tokenizer):
    prepared = prepare_sft(quickstart, tokenizer)
    rows = [json.loads(line) for line in (REPO / "data" / "quickstart" / "sft.jsonl").read_text().splitlines()]
    expected = [tokenize_conversation(r["messages"], tokenizer) for r in rows]
    together = prepared.train.to_list() + prepared.eval.to_list()
    pairs = lambda examples: sorted((e["input_ids"], e["completion_mask"]) for e in examples)  # noqa: E731
    assert pairs(together) == pairs(expected)
    stats = prepared.stats
    assert (stats["train"]["examples"], stats["eval"]["examples"]) == (456, 24)
    assert stats["train"]["trained_tokens"] == sum(sum(r["completion_mask"]) for r in prepared.train)
    assert stats["train"]["tokens"] == sum(len(r["input_ids"]) for r in prepared.train)
    assert prepared.trainer_kwargs == {}
    assert prepared.manifest()["sources"][0] == {"name": "data/quickstart/sft.jsonl", "format": "messages",
                                                 "rows": 480, "kept": 480, "dropped": {}, "truncated": 0,
                                                 "eval": 24, "train": 456}


def test_train_on_prompt_marks_every_token(quickstart, tokenizer):
    recipe = quickstart.model_copy(update={"data": quickstart.data.model_copy(update={"train_on_prompt": True})})
    prepared = prepare_sft(recipe, tokenizer)
    assert all(all(row["completion_mask"]) for row in prepared.train)


def test_dpo_rows_are_trl_conversational_preference_rows(quickstart, tokenizer):
    prepared = prepare_dpo(quickstart, tokenizer)
    rows = [json.loads(line) for line in (REPO / "data" / "quickstart" / "preference.jsonl").read_text().splitlines()]
    assert prepared.train.column_names == ["prompt", "chosen", "rejected"]
    together = prepared.train.to_list() + prepared.eval.to_list()
    key = lambda r: json.dumps(r, sort_keys=True)  # noqa: E731
    assert sorted(map(key, together)) == sorted(map(key, rows))
    assert prepared.trainer_kwargs == {}


def test_workers_give_the_same_rows(write_jsonl, make_recipe, tokenizer, chat):
    path = write_jsonl("chat.jsonl", [chat(i) for i in range(300)] + [{"messages": []}])
    one = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}, num_proc=1, on_bad_row="drop", cache=False),
                      tokenizer)
    two = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}, num_proc=2, on_bad_row="drop", cache=False),
                      tokenizer)
    assert two.train.to_list() == one.train.to_list()
    assert two.stats["sources"] == one.stats["sources"]
    assert one.stats["sources"][0]["dropped"] == {"missing_field": 1}


def test_summary_names_sources_lengths_and_drops(write_jsonl, make_recipe, tokenizer, chat):
    path = write_jsonl("chat.jsonl", [chat(i) for i in range(20)] + [{"messages": [{"role": "user", "content": "x"}]}])
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": path}]}, on_bad_row="drop",
                                       stages=[{"type": "sft", "batch_size": 4}]), tokenizer)
    text = prepared.summary()
    assert f"[sft] data {prepared.fingerprint} (cache miss" in text
    assert "messages (auto)" in text and "1 wrong_turn_order (" in text
    assert f"first dropped in {path}: {path}:21: wrong_turn_order: the conversation must end with" in text
    assert "length p50" in text and "without packing, batches of 4 padded to their longest" in text


def test_rendering_marks_exactly_the_trained_text(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Bye!"}]
    example = tokenize_conversation(messages, tokenizer)
    text = render_trained(example["input_ids"], example["completion_mask"], tokenizer, color=False)
    assert text == (f"<s> [INST] Be brief.\n\nHi [/INST]{OPEN} Hello there</s>{CLOSE} [INST] Bye [/INST]"
                    f"{OPEN} Bye!</s>{CLOSE}")
    assert "\033[32m Hello there</s>\033[0m" in render_trained(example["input_ids"], example["completion_mask"],
                                                               tokenizer, color=True)
