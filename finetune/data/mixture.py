"""Mixing a stage's sources: held-out rows per source, then each source's share of the training rows, seeded.

Pure functions of row counts and index lists; the same seed gives the same mixture on any machine.
"""

from __future__ import annotations

import random


def seeded(seed: int, *labels: object) -> random.Random:
    """A generator for one purpose (a stage, a source): string seeds hash the same way in every process."""
    return random.Random(":".join(map(str, (seed, *labels))))


def hold_out(n_rows: int, eval_fraction: float, rng: random.Random) -> tuple[list[int], list[int]]:
    """(training pool, held-out) row indices, both in row order: a seeded `eval_fraction`, at least one row when
    the fraction is not zero, and never every row."""
    if eval_fraction == 0 or n_rows < 2:
        return list(range(n_rows)), []
    n_eval = min(n_rows - 1, max(1, round(eval_fraction * n_rows)))
    held = set(rng.sample(range(n_rows), n_eval))
    return [i for i in range(n_rows) if i not in held], sorted(held)


def draw(pool: list[int], rng: random.Random, weight: float = 1.0, rows: int | None = None) -> list[int]:
    """A source's training rows: `rows` of them, or `weight` times the pool; whole repeats, then a seeded sample."""
    if not pool:
        return []
    wanted = rows if rows is not None else round(weight * len(pool))
    whole, part = divmod(wanted, len(pool))
    return pool * whole + sorted(rng.sample(pool, part))
