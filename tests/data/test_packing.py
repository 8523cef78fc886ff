"""Packing: best-fit bins within max_seq_len, every example kept whole, and no attention or position leakage across
example boundaries through trl's padding-free collator into transformers' Mixtral (eager and sdpa on CPU; sdpa on
CUDA when there is a GPU)."""

import random
from collections import Counter
from itertools import accumulate

import pytest
import torch

from finetune.data.mixture import seeded
from finetune.data.packing import best_fit_decreasing, pack, padded_batch_efficiency
from finetune.data.prepare import prepare_sft

DEVICES_AND_ATTENTION = [("cpu", "eager"), ("cpu", "sdpa"),
                         pytest.param("cuda", "sdpa", marks=pytest.mark.gpu)]


def test_best_fit_decreasing_fills_bins_without_overflow():
    assert best_fit_decreasing([5, 4, 3, 3, 2, 2, 1], 8) == [[0, 2], [1, 3, 6], [4, 5]]
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 300))]
        bins = best_fit_decreasing(lengths, 64)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
        assert all(sum(lengths[i] for i in b) <= 64 for b in bins)
        # no two bins could be merged: at most one bin is half empty or emptier
        assert sum(sum(lengths[i] for i in b) <= 32 for b in bins) <= 1
    with pytest.raises(ValueError, match="example 1 has 9 tokens, more than the 8"):
        best_fit_decreasing([1, 9], 8)


def test_pack_keeps_every_example_whole_and_records_its_length():
    from datasets import Dataset

    rng = random.Random(1)
    examples = []
    for n in range(200):
        length = rng.randint(2, 60)
        examples.append({"input_ids": [n] * length, "completion_mask": [rng.randint(0, 1) for _ in range(length)]})
    packed = pack(Dataset.from_list(examples), 128, seeded(0, "packing"))
    segments = []
    for row in packed:
        assert len(row["input_ids"]) == len(row["completion_mask"]) == sum(row["seq_lengths"]) <= 128
        start = 0
        for length in row["seq_lengths"]:
            segments.append((tuple(row["input_ids"][start:start + length]),
                             tuple(row["completion_mask"][start:start + length])))
            start += length
    assert Counter(segments) == Counter((tuple(e["input_ids"]), tuple(e["completion_mask"])) for e in examples)
    tokens = sum(len(e["input_ids"]) for e in examples)
    assert len(packed) == -(-tokens // 128) or len(packed) == -(-tokens // 128) + 1  # within one of the ideal


def test_padded_batch_efficiency():
    assert padded_batch_efficiency([4, 4, 2, 2], 2) == 1.0
    assert padded_batch_efficiency([4, 2, 4, 2], 2) == 12 / 16
    assert padded_batch_efficiency([3, 1, 2], 2) == 6 / 8


@pytest.fixture
def packed(write_jsonl, make_recipe, tokenizer, chat):
    rows = [chat(i) for i in range(40)]
    for i in range(0, 40, 3):  # some longer, multi-turn conversations
        rows[i]["messages"] += [{"role": "user", "content": f"and {i} more " * 3},
                                {"role": "assistant", "content": "more " * (i + 1)}]
    path = write_jsonl("chat.jsonl", rows)
    recipe = make_recipe(sft={"sources": [{"path": path}], "packing": True}, max_seq_len=96,
                         stages=[{"type": "sft", "batch_size": 2}])
    return prepare_sft(recipe, tokenizer), prepare_sft(recipe.model_copy(update={"data": recipe.data.model_copy(
        update={"sft": recipe.data.sft.model_copy(update={"packing": False})})}), tokenizer)


def test_prepared_packing_reports_efficiency_and_asks_trl_for_padding_free(packed):
    packed, plain = packed
    assert packed.trainer_kwargs == {"padding_free": True, "packing": False, "max_length": None}
    assert plain.trainer_kwargs == {}
    stats = packed.stats["packing"]
    tokens = sum(len(ids) for ids in plain.train["input_ids"])
    assert stats["examples"] == len(plain.train) and stats["sequences"] == len(packed.train) < len(plain.train)
    assert stats["efficiency"] == round(tokens / (len(packed.train) * 96), 4)
    assert len(packed.train) <= -(-tokens // 96) + 1  # within one sequence of the fewest possible
    assert sorted(map(tuple, plain.train["input_ids"])) == sorted(
        tuple(row["input_ids"][s:s + n]) for row in packed.train
        for s, n in zip([sum(row["seq_lengths"][:k]) for k in range(len(row["seq_lengths"]))], row["seq_lengths"]))
    assert "of the token slots hold tokens" in packed.summary()


def tiny_mixtral(attention: str, device: str):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=512, attn_implementation=attention)
    return MixtralForCausalLM(config).to(device).eval()


def trl_batch(prepared, tokenizer, tmp_path):
    """A batch of the first two training rows, as trl's SFTTrainer prepares and collates them."""
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=2, use_cpu=True,
                     report_to="none", completion_only_loss=True, remove_unused_columns=False,
                     **{"max_length": 96, **prepared.trainer_kwargs})
    trainer = SFTTrainer(model=tiny_mixtral("eager", "cpu"), args=args, train_dataset=prepared.train,
                         processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(2)]
    return trainer.data_collator(rows), rows


def test_trl_batches_restart_positions_at_every_packed_example(packed, tokenizer, tmp_path):
    packed, _ = packed
    batch, rows = trl_batch(packed, tokenizer, tmp_path)
    assert "attention_mask" not in batch  # an attention mask would hide the boundaries from transformers
    lengths = [n for row in rows for n in row["seq_lengths"]]
    positions = torch.cat([torch.arange(n) for n in lengths])
    assert torch.equal(batch["position_ids"][0].cpu(), positions)
    by_content = {tuple(r["input_ids"]): r for r in packed.train}
    ids = [i for row in rows for i in row["input_ids"]]
    masks = [m for row in rows for m in by_content[tuple(row["input_ids"])]["completion_mask"]]
    assert batch["input_ids"][0].tolist() == ids
    assert batch["labels"][0].tolist() == [i if m else -100 for i, m in zip(ids, masks)]


@pytest.mark.parametrize(("device", "attention"), DEVICES_AND_ATTENTION)
def test_packed_examples_see_only_themselves(packed, tokenizer, tmp_path, device, attention):
    """Logits and loss of a packed batch equal those of each example run alone; without the restarts they differ."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    packed, _ = packed
    batch, _ = trl_batch(packed, tokenizer, tmp_path)
    model = tiny_mixtral(attention, device)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) > 3
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        alone = [model(input_ids=batch["input_ids"][:, a:b], labels=batch["labels"][:, a:b], use_cache=False)
                 for a, b in zip(starts, starts[1:])]
        logits = torch.cat([o.logits for o in alone], dim=1)
        assert (out.logits - logits).abs().max().item() < 1e-4
        trained = [(batch["labels"][0, a + 1:b] != -100).sum().item() for a, b in zip(starts, starts[1:])]
        expected_loss = sum(o.loss.item() * n for o, n in zip(alone, trained) if n) / sum(trained)
        assert abs(out.loss.item() - expected_loss) < 1e-4

        # The checks can fail: one causal sequence (positions not restarting) lets examples see each other, and so
        # does a forward that builds a KV cache (the model's default; trl passes use_cache=False when training).
        flat = model(input_ids=batch["input_ids"], use_cache=False).logits
        assert (flat - logits).abs().max().item() > 1e-2
        cached = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
        assert (cached - logits).abs().max().item() > 1e-2


@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_no_packed_example_trains_on_its_first_token(write_jsonl, make_recipe, tokenizer, chat, train_on_prompt):
    """The first token ("<s>") would be predicted from the example before it in the pack: its mask is always 0, so
    the data itself never links two examples, whatever the collator does."""
    path = write_jsonl("chat.jsonl", [chat(i) for i in range(30)])
    prepared = prepare_sft(make_recipe(sft={"sources": [{"path": path}], "packing": True}, max_seq_len=64,
                                       train_on_prompt=train_on_prompt), tokenizer)
    starts = [(row, sum(row["seq_lengths"][:k])) for row in prepared.train for k in range(len(row["seq_lengths"]))]
    assert len(starts) > len(prepared.train)  # some sequences hold several examples
    assert all(row["input_ids"][s] == tokenizer.bos_token_id and row["completion_mask"][s] == 0 for row, s in starts)
    if train_on_prompt:  # and every other token is trained
        assert all(all(row["completion_mask"][s + 1:s + n]) for row in prepared.train
                   for s, n in zip([0, *accumulate(row["seq_lengths"])], row["seq_lengths"]))
