"""Mixtures: each source's share by weight or row count, held-out rows per source, all seeded."""

import random
import re
from collections import Counter

import pytest

from finetune.data.mixture import draw, hold_out, seeded
from finetune.data.prepare import prepare_dpo, prepare_sft


def test_hold_out_is_seeded_disjoint_and_sized():
    for n, fraction, expected in [(100, 0.1, 10), (100, 0.0, 0), (10, 0.01, 1), (2, 0.9, 1), (1, 0.5, 0),
                                  (0, 0.5, 0)]:
        pool, held = hold_out(n, fraction, seeded(1, "x"))
        assert len(held) == expected
        assert sorted(pool + held) == list(range(n))
    assert hold_out(50, 0.2, seeded(1, "x")) == hold_out(50, 0.2, seeded(1, "x"))
    assert hold_out(50, 0.2, seeded(1, "x")) != hold_out(50, 0.2, seeded(2, "x"))


@pytest.mark.parametrize(("weight", "rows", "counts"), [
    (1.0, None, {i: 1 for i in range(10)}),
    (2.0, None, {i: 2 for i in range(10)}),
    (0.5, None, 5),
    (1.5, None, 15),
    (1.0, 3, 3),
    (1.0, 23, 23),
])
def test_draw_repeats_whole_pools_then_samples(weight, rows, counts):
    drawn = draw(list(range(10)), random.Random(0), weight, rows)
    if isinstance(counts, dict):
        assert Counter(drawn) == counts
    else:
        assert len(drawn) == counts
        counts = Counter(drawn).values()
        assert max(counts) - min(counts) <= 1  # no row drawn twice more often than another


def tags_of(input_ids, tokenizer) -> list[str]:
    return [re.match(r"<s> \[INST\] (\w+)-", tokenizer.decode(ids))[1] for ids in input_ids]


def tags(prepared, tokenizer, split="train") -> Counter:
    rows = prepared.train if split == "train" else prepared.eval
    return Counter(tags_of(rows["input_ids"], tokenizer))


def test_sources_are_mixed_by_weight_and_count_with_held_out_rows_per_source(write_jsonl, make_recipe, tokenizer,
                                                                             chat):
    a = write_jsonl("a.jsonl", [chat(i, "a-") for i in range(100)])
    b = write_jsonl("b.jsonl", [chat(i, "b-") for i in range(40)])
    c = write_jsonl("c.jsonl", [chat(i, "c-") for i in range(30)])
    recipe = make_recipe(sft={"sources": [{"path": a, "weight": 0.5}, {"path": b, "weight": 2.0, "eval_fraction": 0.25},
                                          {"path": c, "rows": 50}], "eval_fraction": 0.1})
    prepared = prepare_sft(recipe, tokenizer)
    # a: 10 held out, half of the other 90; b: 10 held out, the other 30 twice; c: 3 held out, 27 + 23 of them
    assert tags(prepared, tokenizer) == {"a": 45, "b": 60, "c": 50}
    assert tags(prepared, tokenizer, "eval") == {"a": 10, "b": 10, "c": 3}
    assert [(s["eval"], s["train"]) for s in prepared.stats["sources"]] == [(10, 45), (10, 60), (3, 50)]
    assert not set(map(tuple, prepared.train["input_ids"])) & set(map(tuple, prepared.eval["input_ids"]))

    again = prepare_sft(recipe.model_copy(update={"data": recipe.data.model_copy(update={"cache": False})}), tokenizer)
    assert again.train["input_ids"] == prepared.train["input_ids"]
    other_seed = prepare_sft(recipe.model_copy(update={"seed": 7}), tokenizer)
    assert tags(other_seed, tokenizer) == tags(prepared, tokenizer)
    assert other_seed.train["input_ids"] != prepared.train["input_ids"]


def test_training_order_interleaves_sources(write_jsonl, make_recipe, tokenizer, chat):
    a = write_jsonl("a.jsonl", [chat(i, "a-") for i in range(50)])
    b = write_jsonl("b.jsonl", [chat(i, "b-") for i in range(50)])
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": a}, {"path": b}]}), tokenizer)
    first_half = Counter(tags_of(prepared.train["input_ids"][:50], tokenizer))
    assert 15 < first_half["a"] < 35


def test_dpo_mixture(write_jsonl, make_recipe, tokenizer, preference):
    a = write_jsonl("a.jsonl", [preference(i, "a-") for i in range(20)])
    b = write_jsonl("b.jsonl", [preference(i, "b-") for i in range(20)])
    prepared = prepare_dpo(make_recipe(dpo={"sources": [{"path": a, "rows": 5}, {"path": b, "weight": 1.5}],
                                            "eval_fraction": 0.1}), tokenizer)
    counts = Counter(row["prompt"][0]["content"][0] for row in prepared.train)
    assert counts == {"a": 5, "b": 27}
    assert len(prepared.eval) == 4
