"""Padding-free packing: which training samples share a row, and the dataset of packs the Trainer iterates.

The plan works on the token bound of every checked row (the `__length__` column the pre-training check
adds: the most tokens the row can take once encoded), so it needs no encoding of its own and a pack's
samples, once encoded, never exceed the row capacity (`--max_seq_length`). A sample is never split:
each row of the data is in exactly one pack.

- `best_fit` (default): best-fit decreasing. Samples from longest to shortest, each into the pack whose
  free space it fills most tightly, a new pack when none has room; the packs are then shuffled with the
  seed, so the longest samples do not all come first. Fills rows best on mixed lengths.
- `greedy`: in data order, a new pack whenever the next sample does not fit (next-fit); keeps the data's
  order inside and across packs.

The Trainer iterates `PackedRows`: one item per pack, each a `Pack` of the pack's raw rows (with their
`__index__`, so errors still name the row). The collator encodes every sample through the one encoding
path and joins them (`collate.pack_rows`). `Pack` is not a dict, so the Trainer's column removal never
touches it. With packing, `--per_device_train_batch_size` counts packed rows.

`--padding_free` needs no plan: each training row is marked (`PADDING_FREE`), and the collator joins a
batch of marked rows into one row; this works on streams too. Evaluation rows are never marked nor
packed, so evaluation scores each sample in its own row as without packing.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Sequence
from dataclasses import dataclass

import datasets
import torch

from .prepare import LENGTH
from .sources import Rows

STRATEGIES = ("best_fit", "greedy")
# Column that marks training rows for `--padding_free` (the collator joins a batch of them into one row).
PADDING_FREE = "__padding_free__"


@dataclass(frozen=True)
class Pack:
    """The raw rows of one packed row, in order. Deliberately not a dict: the Trainer's
    `remove_unused_columns` wrapper passes anything else through untouched."""

    rows: tuple[dict, ...]


def plan_packs(bounds: Sequence[int], capacity: int, strategy: str = "best_fit", seed: int = 0) -> list[list[int]]:
    """Packs of row indices: each row in exactly one pack, each pack's bounds summing to at most `capacity`.

    Row indices inside a pack are in data order. A bound above `capacity` cannot come from a checked row
    (the check shortens or skips longer ones) and is refused rather than split.
    """
    if capacity < 1:
        raise ValueError(f"the row capacity must be at least 1 token, got {capacity}")
    too_long = next((i for i, b in enumerate(bounds) if b > capacity), None)
    if too_long is not None:
        raise ValueError(
            f"row {too_long} can take {bounds[too_long]} tokens, more than the {capacity} a packed row holds; "
            "the pre-training check should have shortened or skipped it (a vlmtune bug: please report it)"
        )
    if strategy == "greedy":
        return _next_fit(bounds, capacity)
    if strategy != "best_fit":
        raise ValueError(f"packing strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    packs = [sorted(pack) for pack in _best_fit_decreasing(bounds, capacity)]
    random.Random(seed).shuffle(packs)
    return packs


def _next_fit(bounds: Sequence[int], capacity: int) -> list[list[int]]:
    """Data order; a new pack when the next row does not fit in the current one."""
    packs: list[list[int]] = []
    free = 0
    for i, bound in enumerate(bounds):
        if bound > free or not packs:
            packs.append([])
            free = capacity
        packs[-1].append(i)
        free -= bound
    return packs


def _best_fit_decreasing(bounds: Sequence[int], capacity: int) -> list[list[int]]:
    """Longest first, each into the open pack with the least free space that still fits it.

    Open packs are kept by free space: a sorted list of the distinct free amounts (at most `capacity`
    of them) and, per amount, the packs that have it; a lookup is one bisection, so 100k rows plan in
    well under a second.
    """
    packs: list[list[int]] = []
    by_free: dict[int, list[int]] = {}  # free tokens -> open packs with exactly that much room
    amounts: list[int] = []  # the keys of by_free, sorted
    for i in sorted(range(len(bounds)), key=lambda i: (-bounds[i], i)):
        bound = bounds[i]
        k = bisect_left(amounts, bound)
        if k < len(amounts):
            free = amounts[k]
            pack = by_free[free].pop()
            if not by_free[free]:
                del by_free[free]
                amounts.pop(k)
        else:
            free, pack = capacity, len(packs)
            packs.append([])
        packs[pack].append(i)
        left = free - bound
        if left > 0:
            if left not in by_free:
                by_free[left] = []
                insort(amounts, left)
            by_free[left].append(pack)
    return packs


@dataclass
class PackPlan:
    """A training split's packs and what they cost, for the run's summary."""

    packs: list[list[int]]
    bounds: list[int]
    capacity: int
    strategy: str

    @property
    def fill(self) -> float:
        """Share of the packed rows' capacity that the samples' token bounds fill (the real share is at
        most this: a bound is never below the encoded length)."""
        return sum(self.bounds) / (len(self.packs) * self.capacity) if self.packs else 0.0

    def summary(self, batch_size: int) -> str:
        return (
            f"Packing: {len(self.bounds)} samples -> {len(self.packs)} packed rows of at most {self.capacity} tokens "
            f"({self.strategy}, {self.fill:.0%} full by the samples' token bounds); "
            f"--per_device_train_batch_size {batch_size} counts packed rows"
        )


class PackedRows(torch.utils.data.Dataset):
    """The training rows, one item per pack: a `Pack` of the pack's raw rows."""

    def __init__(self, rows: datasets.Dataset, packs: list[list[int]]):
        self.rows = rows
        self.packs = packs

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, i: int) -> Pack:
        columns = self.rows[self.packs[i]]  # one read for the whole pack, column by column
        return Pack(tuple(dict(zip(columns, values)) for values in zip(*columns.values())))


def packed_train_rows(rows: Rows, capacity: int, strategy: str, seed: int) -> tuple[PackedRows, PackPlan]:
    """`rows` (checked, with their token bounds) as a dataset of packs, and its plan."""
    if not isinstance(rows, datasets.Dataset) or LENGTH not in rows.column_names:
        # The check adds the bounds whenever it runs with the processor, as training always does.
        raise ValueError(f"packing needs checked rows with their {LENGTH} column (a vlmtune bug: please report it)")
    bounds = list(rows[LENGTH])
    plan = PackPlan(plan_packs(bounds, capacity, strategy, seed), bounds, capacity, strategy)
    return PackedRows(rows, plan.packs), plan


def padding_free_rows(rows: Rows) -> Rows:
    """`rows` marked so the collator joins each batch of them into one row (streams are marked as read)."""
    if isinstance(rows, datasets.IterableDataset):
        return rows.map(lambda row: {PADDING_FREE: True})
    return rows.add_column(PADDING_FREE, [True] * len(rows))
