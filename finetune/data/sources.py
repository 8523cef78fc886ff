"""Read a stage's data sources into rows, and turn rows into training examples.

Every problem with a row is reported with the file and the row number (1-based line for JSON Lines).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from finetune.errors import FinetuneError
from finetune.recipe.schema import DataSource, StageData


class DataError(FinetuneError, ValueError):
    """Input data that cannot be used, naming the source and the row."""


@dataclass(frozen=True)
class Row:
    source: str
    number: int
    data: dict


def read_source(source: DataSource) -> Iterator[Row]:
    if source.path is not None:
        yield from _read_jsonl(Path(source.path))
        return
    import datasets

    for i, data in enumerate(datasets.load_dataset(source.hub, split=source.split), start=1):
        yield Row(f"{source.hub}[{source.split}]", i, data)


def _read_jsonl(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                data = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{number}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{number}: not valid JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(data, dict):
                raise DataError(f"{path}:{number}: a row must be a JSON object, got {type(data).__name__}")
            yield Row(str(path), number, data)


def read_stage_rows(data: StageData, seed: int) -> list[Row]:
    """All rows of a stage's sources, each source repeated or subsampled by its weight, then shuffled."""
    rng = random.Random(seed)
    rows: list[Row] = []
    for source in data.sources:
        source_rows = list(read_source(source))
        if not source_rows:
            raise DataError(f"{source.path or source.hub}: holds no rows")
        whole, fraction = divmod(source.weight, 1.0)
        rows += source_rows * int(whole) + rng.sample(source_rows, round(fraction * len(source_rows)))
    rng.shuffle(rows)
    return rows


def split_eval(examples: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Hold out a seeded fraction for evaluation (at least one example when the fraction is non-zero)."""
    if eval_fraction == 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(eval_fraction * len(examples)))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def fingerprint(data: StageData) -> str:
    """A content hash of the stage's local files and settings, recorded in the stage manifest."""
    h = hashlib.sha256(data.model_dump_json().encode())
    for source in data.sources:
        if source.path is not None:
            h.update(Path(source.path).read_bytes())
    return h.hexdigest()[:16]
