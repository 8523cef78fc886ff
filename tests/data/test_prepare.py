"""prepare_sft / prepare_dpo on the quickstart data: rows ready for trl, masks on assistant tokens only, workers."""

import json
from itertools import accumulate
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.data.chat import tokenize_conversation, tokenize_prompt
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


def test_train_on_prompt_marks_every_token_but_bos(quickstart, tokenizer):
    recipe = quickstart.model_copy(update={"data": quickstart.data.model_copy(update={"train_on_prompt": True})})
    prepared = prepare_sft(recipe, tokenizer)
    assert all(row["completion_mask"] == [0] + [1] * (len(row["input_ids"]) - 1) for row in prepared.train)
    train = prepared.stats["train"]
    assert train["trained_tokens"] == train["tokens"] - train["examples"]


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


@pytest.mark.parametrize("packing", [False, True])
def test_an_example_of_exactly_max_seq_len_tokens_is_kept_whole_and_one_more_is_not(write_jsonl, make_recipe,
                                                                                      tokenizer, packing):
    messages = [{"role": "user", "content": "Count to four."}, {"role": "assistant", "content": "one two three four"}]
    short = [messages[0], {"role": "assistant", "content": "4"}]
    full = tokenize_conversation(messages, tokenizer)
    n = len(full["input_ids"])
    path = write_jsonl("rows.jsonl", [{"messages": messages}, {"messages": short}])

    def longest(max_seq_len: int, on_too_long: str):
        """The stats and the longest training example's ids and mask (taken out of its pack when packed)."""
        recipe = make_recipe(sft={"sources": [{"path": path}], "packing": packing}, max_seq_len=max_seq_len,
                             on_too_long=on_too_long)
        prepared = prepare_sft(recipe, tokenizer)
        examples = []
        for row in prepared.train:
            bounds = list(accumulate(row.get("seq_lengths", [len(row["input_ids"])]), initial=0))
            examples += [(row["input_ids"][a:b], row["completion_mask"][a:b]) for a, b in zip(bounds, bounds[1:])]
        return prepared.stats, max(examples, key=lambda e: len(e[0]))

    stats, example = longest(n, "drop")
    assert (stats["dropped"], stats["truncated"], stats["train"]["length"]["max"]) == ({}, 0, n)
    assert example == (full["input_ids"], full["completion_mask"])
    stats, example = longest(n - 1, "drop")
    assert stats["dropped"] == {"too_long": 1} and stats["train"]["examples"] == 1
    stats, example = longest(n - 1, "truncate")
    assert (stats["dropped"], stats["truncated"], stats["train"]["length"]["max"]) == ({}, 1, n - 1)
    # the closing "</s>" is what is cut: the kept tokens keep their own mask, and the counts say so
    assert example == (full["input_ids"][:-1], full["completion_mask"][:-1])
    trained_short = sum(tokenize_conversation(short, tokenizer)["completion_mask"])
    assert stats["train"]["trained_tokens"] == sum(full["completion_mask"]) - 1 + trained_short


def test_dpo_rows_are_the_ones_trl_keeps_and_the_counts_are_what_trl_trains(tmp_path, make_recipe, tokenizer):
    """trl tokenizes the prepared rows with the chat template and cuts prompt + reply to max_length (the recipe's
    max_seq_len): it must drop none of the rows kept here, and train the tokens counted here."""
    from trl.trainer.dpo_trainer import DataCollatorForPreference, DPOTrainer

    prompt = [{"role": "user", "content": "Name three colours, please."}]
    p = len(tokenize_prompt(prompt, tokenizer))
    rows = [
        {"prompt": prompt, "chosen": "Red, green and blue.", "rejected": "No."},  # prompt fits with one reply token
        {"prompt": "Name three colours now, please.", "chosen": "Red.", "rejected": "Blue."},  # prompt fills it
        {"prompt": "Hi", "chosen": "Hello.", "rejected": "Go."},  # fits whole
    ]
    assert len(tokenize_prompt([{"role": "user", "content": rows[1]["prompt"]}], tokenizer)) == p + 1
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    recipe = make_recipe(dpo={"sources": [{"path": str(path)}]}, max_seq_len=p + 1, on_too_long="truncate",
                         on_bad_row="drop")
    prepared = prepare_dpo(recipe, tokenizer)
    assert prepared.stats["dropped"] == {"no_trainable_tokens": 1} and prepared.stats["truncated"] == 1

    args = SimpleNamespace(dataset_num_proc=None, max_length=p + 1, truncation_mode="keep_start")
    tokenized = DPOTrainer._prepare_dataset(None, prepared.train, tokenizer, args, "train")
    assert len(tokenized) == len(prepared.train) == 2
    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=p + 1)(list(tokenized))
    assert batch["input_ids"][:, 0].tolist() == [tokenizer.bos_token_id] * 4
    assert (batch["input_ids"] == tokenizer.bos_token_id).sum().item() == 4  # one "<s>" a sequence
    assert batch["completion_mask"].sum().item() == prepared.stats["train"]["trained_tokens"]
    assert batch["attention_mask"].shape[1] == prepared.stats["train"]["length"]["max"] == p + 1
    whole = next(row for row in tokenized if len(row["prompt_ids"]) < p)
    assert whole["chosen_ids"][-1] == whole["rejected_ids"][-1] == tokenizer.eos_token_id
