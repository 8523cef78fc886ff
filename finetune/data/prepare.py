"""A stage's data, from the recipe to rows trl can train on: read, tokenize, judge, mix, pack, cache.

    prepared = prepare_sft(recipe, tokenizer)   # or prepare_dpo
    SFTConfig(**{**common_kwargs, **prepared.trainer_kwargs}); SFTTrainer(train_dataset=prepared.train, ...)

SFT rows are `input_ids` and a `completion_mask` (and `seq_lengths` when packed); DPO rows are trl's conversational
`prompt`/`chosen`/`rejected`. The result is cached by a key of everything it depends on (see cache.py).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from finetune.data import cache
from finetune.data.examples import preference_examples, preference_features, sft_examples, sft_features
from finetune.data.formats import REASONS, detect_format
from finetune.data.mixture import draw, hold_out, seeded
from finetune.data.packing import pack, padded_batch_efficiency
from finetune.data.report import summary
from finetune.data.sources import DataError, OpenedSource, SourceRows, open_source, read_source

if TYPE_CHECKING:
    from datasets import Dataset

    from finetune.recipe.schema import Recipe

TRAIN_COLUMNS = {"sft": ["input_ids", "completion_mask"], "dpo": ["prompt", "chosen", "rejected"]}
ROWS_PER_WORKER = 20_000
BATCH_ROWS = 500  # rows per tokenizer call
SHOWN_PROBLEMS = 10


@dataclass
class Prepared:
    """A stage's training and held-out rows, what was done to get them, and the trainer settings they need."""

    stage: str
    train: Dataset
    eval: Dataset | None
    stats: dict
    fingerprint: str  # the cache key: the data's content, its settings, the tokenizer and this code
    sources: tuple[str, ...]  # each source's content fingerprint
    trainer_kwargs: dict = field(default_factory=dict)

    def summary(self) -> str:
        return summary(self.stats)

    def manifest(self) -> dict:
        """What the stage manifest records about its data."""
        stats = self.stats
        sources = [{k: s[k] for k in ("name", "format", "rows", "kept", "dropped", "truncated", "eval", "train")}
                   for s in stats["sources"]]
        return {"train": stats["train"]["examples"], "eval": stats["eval"]["examples"] if stats["eval"] else 0,
                "dropped": stats["dropped"], "truncated": stats["truncated"], "packing": stats.get("packing"),
                "sources": sources, "cache": stats["cache"]["status"]}


def prepare_sft(recipe: Recipe, tokenizer) -> Prepared:
    return prepare(recipe, tokenizer, "sft")


def prepare_dpo(recipe: Recipe, tokenizer) -> Prepared:
    return prepare(recipe, tokenizer, "dpo")


def prepare(recipe: Recipe, tokenizer, stage: str) -> Prepared:
    spec = recipe.data
    if getattr(spec, stage) is None:
        raise DataError(f"the recipe has no data.{stage} section")
    started = time.perf_counter()
    opened = [open_source(source, f"data.{stage}.sources.{index}")
              for index, source in enumerate(getattr(spec, stage).sources)]
    key = cache.data_key(_key_parts(recipe, tokenizer, stage, opened))
    entry = cache.load(key) if spec.cache else None
    if entry is not None:
        train, held_out, stats = entry
        status = "hit"
    else:
        train, held_out, stats = _build(recipe, tokenizer, stage, opened, key)
        stats["fingerprint"] = key
        if spec.cache:
            cache.save(key, train, held_out, stats)
        status = "miss" if spec.cache else "off"
    stats["cache"] = {"status": status, "path": str(cache.entry_path(key)) if spec.cache else None,
                      "seconds": round(time.perf_counter() - started, 2)}
    if stage == "sft":  # the stage's batch size is not part of the key: measured on the rows, hit or miss
        stats["padded_batches"] = _padded_batches(recipe, train)
    return Prepared(stage, train, held_out, stats, key, tuple(o.fingerprint for o in opened),
                    _trainer_kwargs(recipe, stage, stats))


def _key_parts(recipe: Recipe, tokenizer, stage: str, opened: list[OpenedSource]) -> dict:
    spec = recipe.data
    settings = spec.model_dump(mode="json", include={"max_seq_len", "on_too_long", "on_bad_row"})
    if stage == "sft":
        settings["train_on_prompt"] = spec.train_on_prompt
    return {"stage": stage, "seed": recipe.seed, "settings": settings,
            "stage_data": getattr(spec, stage).model_dump(mode="json"),
            "tokenizer": cache.tokenizer_identity(tokenizer), "sources": [o.fingerprint for o in opened]}


def _build(recipe: Recipe, tokenizer, stage: str, opened: list[OpenedSource], key: str):
    from datasets import concatenate_datasets

    spec, stage_data = recipe.data, getattr(recipe.data, stage)
    tables = [read_source(o) for o in opened]
    workers = _workers(spec.num_proc, sum(len(t.rows) for t in tables))
    formats = [_row_format(stage, table) for table in tables]
    examples = [_tokenize(recipe, tokenizer, stage, table, row_format, workers, f"{key}-{index}")
                for index, (table, row_format) in enumerate(zip(tables, formats))]
    _fail_on_problems(recipe, stage, tables, examples)

    source_stats, kept, train_parts, eval_parts, offset = [], [], [], [], 0
    for index, (table, rows, row_format) in enumerate(zip(tables, examples, formats)):
        source = table.source
        reasons = column(rows, "reason")
        usable = [i for i, reason in enumerate(reasons) if not reason]
        rng = seeded(recipe.seed, stage, index, source.name)
        eval_fraction = source.eval_fraction if source.eval_fraction is not None else stage_data.eval_fraction
        pool, held = hold_out(len(usable), eval_fraction, rng)
        drawn = draw(pool, rng, source.weight, source.rows)
        kept.append(rows.select(usable))
        train_parts += [offset + i for i in drawn]
        eval_parts += [offset + i for i in held]
        offset += len(usable)
        source_stats.append(_source_stats(table, row_format, rows, reasons, len(held), len(drawn)))
    if not train_parts:
        raise DataError(f"data.{stage}: no training rows are left; per source:\n"
                        + summary({"stage": stage, "sources": source_stats}))

    every = concatenate_datasets(kept)
    seeded(recipe.seed, stage, "order").shuffle(train_parts)
    train = every.select(train_parts)
    held_out = every.select(eval_parts) if eval_parts else None
    stats = {
        "stage": stage,
        "settings": {"max_seq_len": spec.max_seq_len, "on_too_long": spec.on_too_long, "on_bad_row": spec.on_bad_row},
        "sources": source_stats,
        "dropped": dict(sum((Counter(s["dropped"]) for s in source_stats), Counter())),
        "truncated": sum(s["truncated"] for s in source_stats),
        "train": _split_stats(train),
        "eval": _split_stats(held_out) if held_out is not None else None,
    }
    train = train.select_columns(TRAIN_COLUMNS[stage])
    if stage == "sft" and stage_data.packing:
        packed = pack(train, spec.max_seq_len, seeded(recipe.seed, stage, "packing"))
        stats["packing"] = {"examples": len(train), "sequences": len(packed), "capacity": spec.max_seq_len,
                            "efficiency": round(stats["train"]["tokens"] / (len(packed) * spec.max_seq_len), 4)}
        train = packed
    if held_out is not None:
        held_out = held_out.select_columns(TRAIN_COLUMNS[stage])
    return train, held_out, stats


def _tokenize(recipe: Recipe, tokenizer, stage: str, table: SourceRows, row_format: str, workers: int,
              fingerprint: str) -> Dataset:
    spec, source = recipe.data, table.source
    common = dict(columns=dict(source.columns), tokenizer=tokenizer, max_seq_len=spec.max_seq_len,
                  on_too_long=spec.on_too_long)
    if stage == "sft":
        function, features = sft_examples, sft_features()
        kwargs = dict(common, row_format=row_format, train_on_prompt=spec.train_on_prompt)
    else:
        function, features, kwargs = preference_examples, preference_features(), common
    return table.rows.map(
        function, batched=True, batch_size=BATCH_ROWS, fn_kwargs=kwargs, features=features,
        remove_columns=table.rows.column_names,
        num_proc=workers if len(table.rows) >= 2 * workers > 2 else None, new_fingerprint=fingerprint,
        desc=f"[{stage}] tokenizing {source.name}",
    )


def _row_format(stage: str, table: SourceRows) -> str:
    source = table.source
    if source.format != "auto":
        return source.format
    if not table.keys:  # an empty source, or no row parses: each row is judged (and reported) on its own
        return "messages" if stage == "sft" else "preference"
    detected = detect_format(table.keys, source.columns)
    if detected is None:
        raise DataError(f"{source.name}: cannot tell the row format from its fields {sorted(table.keys)}; set its "
                        "'format' (messages, prompt_completion, instruction, preference) and 'columns'")
    if (stage == "dpo") != (detected == "preference"):
        wanted = "preference rows (prompt, chosen, rejected)" if stage == "dpo" else "chat or instruction rows"
        raise DataError(f"{source.name}: a {stage} stage reads {wanted}; this source's fields "
                        f"{sorted(table.keys)} look like '{detected}' rows")
    return detected


def _fail_on_problems(recipe: Recipe, stage: str, tables: list[SourceRows], examples: list[Dataset]) -> None:
    """Stop, naming file, row and reason, on what the recipe says must not be dropped: every problem at once."""
    spec = recipe.data
    empty = [f"{t.source.name}: {t.empty_reason()}" for t in tables if len(t.rows) == 0 and spec.on_bad_row == "fail"]
    problems: list[str] = list(empty)
    counts: Counter = Counter()
    for table, rows in zip(tables, examples):
        if not len(rows):
            continue
        for row, reason, detail in zip(column(rows, "row"), column(rows, "reason"), column(rows, "detail")):
            fatal = spec.on_too_long == "fail" if reason == "too_long" else spec.on_bad_row == "fail"
            if reason and fatal:
                counts[reason] += 1
                if len(problems) < SHOWN_PROBLEMS:
                    problems.append(f"{table.locate(row)}: {reason}: {detail}")
    if problems:
        shown = "\n".join(f"  - {p}" for p in problems)
        total = sum(counts.values())
        more = f"\n  ... and {total + len(empty) - len(problems)} more" if total + len(empty) > len(problems) else ""
        found, hint = [], "Fix the source or its split, or set data.on_bad_row: drop to go on without it."
        if total:
            found.append(f"{total} row(s) cannot be used ({', '.join(f'{n} {r}' for r, n in counts.most_common())})")
            hint = ("Fix the rows, or set data.on_bad_row: drop (and data.on_too_long: drop or truncate) to skip them; "
                    "skipped rows are counted by reason.")
        if empty:
            found.append(f"{len(empty)} source(s) give no rows")
        raise DataError(f"data.{stage}: {' and '.join(found)}:\n{shown}{more}\n{hint}")


def _source_stats(table: SourceRows, row_format: str, rows: Dataset, reasons: list[str], held: int,
                  drawn: int) -> dict:
    dropped = Counter(reason for reason in reasons if reason)
    usable = len(reasons) - sum(dropped.values())
    first = next((i for i, reason in enumerate(reasons) if reason), None)
    stats = {
        "name": table.source.name, "format": row_format, "detected": table.source.format == "auto",
        "rows": len(reasons), "kept": usable,
        "dropped": {r: dropped[r] for r in REASONS if r in dropped},
        "truncated": sum(column(rows, "truncated")),
        "eval": held, "train": drawn, "empty": table.empty_reason() if not reasons else False,
        "first_dropped": (f"{table.locate(rows[first]['row'])}: {reasons[first]}: {rows[first]['detail']}"
                          if first is not None else None),
    }
    return stats


def _split_stats(rows: Dataset) -> dict:
    import numpy as np

    lengths = np.asarray(column(rows, "length"), dtype=np.int64)
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).round().astype(int).tolist()
    return {
        "examples": len(rows), "tokens": int(lengths.sum()), "trained_tokens": sum(column(rows, "trained")),
        "length": {"min": int(lengths.min()), "p50": p50, "p90": p90, "p99": p99, "max": int(lengths.max())},
    }


def _padded_batches(recipe: Recipe, train: Dataset) -> dict:
    """What share of the token slots would hold tokens in unpacked batches of the SFT stage's size."""
    import pyarrow.compute as pc

    table = train.with_format("arrow")[:]
    if "seq_lengths" in table.column_names:
        lengths = pc.list_flatten(table["seq_lengths"]).to_numpy().tolist()
        seeded(recipe.seed, "sft", "batches").shuffle(lengths)  # packed neighbours are alike; training order is not
    else:
        lengths = pc.list_value_length(table["input_ids"]).to_numpy()
    batch_size = next((s.batch_size for s in recipe.stages if s.type == "sft"), 1)
    return {"batch_size": batch_size, "efficiency": round(padded_batch_efficiency(lengths, batch_size), 4)}


def column(rows: Dataset, name: str) -> list:
    """One column as a Python list, in the dataset's row order (read through arrow: far faster than row access)."""
    return rows.select_columns([name]).to_dict()[name] if len(rows) else []


def _workers(num_proc: int | None, rows: int) -> int:
    if num_proc is not None:
        return num_proc
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, rows // ROWS_PER_WORKER))


def _trainer_kwargs(recipe: Recipe, stage: str, stats: dict) -> dict:
    """Settings of trl's SFTConfig/DPOConfig that the prepared data needs; they override the stage's own."""
    if stage == "sft" and stats.get("packing"):
        # Packed rows carry `seq_lengths`: trl's padding-free collator turns them into restarting position ids and
        # passes no attention mask, which is what lets transformers find the example boundaries. Packing is done
        # here, so trl must not pack again (that would drop `seq_lengths`) nor cut rows to max_length.
        return {"padding_free": True, "packing": False, "max_length": None}
    if stage == "dpo":
        workers = _workers(recipe.data.num_proc, stats["train"]["examples"])
        return {"dataset_num_proc": workers} if workers > 1 else {}
    return {}
