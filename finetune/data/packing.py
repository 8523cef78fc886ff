"""Packing SFT examples into sequences of max_seq_len tokens, best-fit decreasing, with each example's length kept.

A packed row holds the examples' `input_ids` and `completion_mask` one after the other and their lengths in
`seq_lengths`; trl's padding-free collator turns those into position ids that restart at every example, and
transformers' sdpa/eager masks (and flash-attention's varlen kernels) read the restarts as example boundaries.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from datasets import Dataset


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices, no bin over `capacity` tokens: longest first, each into the fullest bin it fits."""
    bins: list[list[int]] = []
    room: list[tuple[int, int]] = []  # (tokens free, bin), sorted: the first that fits is the best fit
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        length = lengths[index]
        if length > capacity:
            raise ValueError(f"example {index} has {length} tokens, more than the {capacity} a sequence holds")
        at = bisect.bisect_left(room, (length, -1))
        if at < len(room):
            free, target = room.pop(at)
        else:
            free, target = capacity, len(bins)
            bins.append([])
        bins[target].append(index)
        if free - length > 0:
            bisect.insort(room, (free - length, target))
    return bins


def pack(examples: Dataset, capacity: int, rng: random.Random) -> Dataset:
    """Rows of `input_ids`/`completion_mask` packed into rows of at most `capacity` tokens, in a seeded order."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset

    table = examples.select_columns(["input_ids", "completion_mask"]).with_format("arrow")[:]
    ids, mask = table["input_ids"].combine_chunks(), table["completion_mask"].combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy().astype(np.int64)
    bins = best_fit_decreasing(lengths.tolist(), capacity)
    rng.shuffle(bins)  # the first bins hold the longest examples
    order = pa.array([i for members in bins for i in members], pa.int64())
    ordered_lengths = lengths[order.to_numpy()]
    examples_per_row = np.array([len(members) for members in bins])
    row_starts = np.concatenate([[0], np.cumsum(examples_per_row)])
    token_starts = np.concatenate([[0], np.cumsum(ordered_lengths)])[row_starts]

    def packed(column: pa.ListArray) -> pa.ListArray:
        return pa.ListArray.from_arrays(pa.array(token_starts, pa.int32()), column.take(order).flatten())

    return Dataset(pa.table({
        "input_ids": packed(ids),
        "completion_mask": packed(mask),
        "seq_lengths": pa.ListArray.from_arrays(pa.array(row_starts, pa.int32()),
                                                pa.array(ordered_lengths, pa.int32())),
    }))


def padded_batch_efficiency(lengths: Sequence[int], batch_size: int) -> float:
    """Share of real tokens in batches of `batch_size` examples, in this order, each padded to its longest."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return 0.0
    slots = sum(int(chunk.max()) * len(chunk) for chunk in np.split(lengths, range(batch_size, len(lengths),
                                                                                    batch_size)))
    return int(lengths.sum()) / slots
