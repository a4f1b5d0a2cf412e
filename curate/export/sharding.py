"""Which rows an export writes, in which order, and which task writes which of them.

The driver never holds the rows: scan tasks read the selection's metadata, each part is
reduced to a histogram of sort keys (`BINS` per group), and from the summed histogram the
driver cuts the ordered selection into rank ranges, one per writer task. A part is split
by key bins; a writer gets the bins that hold its ranks, sorts them and keeps its ranks
exactly, so shards are full (`shard_size` samples) whatever the number of tasks, and the
same selection, order and seed always give the same shards.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curate.export.buckets import assign

#: Key bins per group: the grain at which rows are sent to writers.
BINS = 4096
_SHIFT = np.uint64(64 - 12)
#: Rows a writer task takes at least (then rounded up to whole shards) ...
TASK_ROWS = 2048
#: ... and tasks of one export at most (bigger tasks on bigger selections).
MAX_TASKS = 512

#: Columns added to scanned rows: the sort key, the group (bucket) and the key bin.
KEY, GROUP, BIN = "_key", "_group", "_bin"


@dataclass(frozen=True)
class Order:
    """How the selection is ordered: by group (bucket, when shards are grouped), then by a
    key that is the sample_id's own hash (no seed) or a seeded hash of it."""

    seed: int | None
    buckets: tuple[str, ...] = ()
    group_by_bucket: bool = False

    @property
    def groups(self) -> int:
        return len(self.buckets) + 1 if self.group_by_bucket else 1  # + unknown size

    def keys(self, ids: list[str]) -> np.ndarray:
        if self.seed is None:  # sample_ids are hex digests: their own order is uniform
            return np.array([int(i[:16].ljust(16, "0"), 16) for i in ids], dtype=np.uint64)
        salt = str(self.seed).encode()
        return np.array([int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8,
                                                        key=salt[:64]).digest(), "big")
                         for i in ids], dtype=np.uint64)

    def bucket_of(self, table: pa.Table) -> np.ndarray:
        if not self.buckets:
            return np.full(table.num_rows, -1)
        size = [table[c].to_numpy(zero_copy_only=False) if c in table.column_names
                else np.zeros(table.num_rows) for c in ("width", "height")]
        return assign(np.nan_to_num(size[0].astype(float)),
                      np.nan_to_num(size[1].astype(float)), self.buckets)

    def annotate(self, table: pa.Table) -> pa.Table:
        """`table` with its rows' key, group and bin."""
        keys = self.keys(table["sample_id"].to_pylist())
        group = (self.bucket_of(table) % self.groups if self.group_by_bucket
                 else np.zeros(table.num_rows, np.int64))  # unknown size (-1): last group
        return (table.append_column(KEY, pa.array(keys, pa.uint64()))
                .append_column(GROUP, pa.array(group, pa.int32()))
                .append_column(BIN, pa.array((keys >> _SHIFT).astype(np.int32))))


def histogram(table: pa.Table, order: Order) -> np.ndarray:
    """Rows per (group, bin) of an annotated part."""
    table = order.annotate(table)
    flat = table[GROUP].to_numpy() * BINS + table[BIN].to_numpy()
    return np.bincount(flat, minlength=order.groups * BINS).reshape(order.groups, BINS)


@dataclass(frozen=True)
class WriterTask:
    """Ranks [start, stop) of one group's order, found in bins [first_bin, last_bin]
    whose first row has rank `base`."""

    index: int
    group: int
    start: int
    stop: int
    first_bin: int
    last_bin: int
    base: int


def plan(counts: np.ndarray, limit: int | None, shard_size: int) -> list[WriterTask]:
    """Writer tasks over the selection (`counts`: rows per group and bin), the first
    `limit` rows of the order only; each task's ranks are whole shards of its group."""
    totals = counts.sum(axis=1)
    if limit is not None:  # the first `limit` rows of the whole order: groups in turn
        room = np.maximum(limit - np.concatenate([[0], np.cumsum(totals)[:-1]]), 0)
        totals = np.minimum(totals, room)
    selected = int(totals.sum())
    per_task = max(TASK_ROWS, math.ceil(selected / MAX_TASKS))
    per_task = math.ceil(per_task / shard_size) * shard_size
    tasks: list[WriterTask] = []
    for group, total in enumerate(totals):
        cumulative = np.cumsum(counts[group])
        for start in range(0, int(total), per_task):
            stop = min(start + per_task, int(total))
            first = int(np.searchsorted(cumulative, start, side="right"))
            last = int(np.searchsorted(cumulative, stop - 1, side="right"))
            base = int(cumulative[first - 1]) if first else 0
            tasks.append(WriterTask(len(tasks), group, start, stop, first, last, base))
    return tasks


def split(table: pa.Table, order: Order, tasks: list[WriterTask]) -> tuple[pa.Table, ...]:
    """An annotated part cut into one piece per writer task (a bin at the edge of two
    tasks goes to both: each keeps its own ranks)."""
    table = order.annotate(table)
    flat = table[GROUP].to_numpy().astype(np.int64) * BINS + table[BIN].to_numpy()
    ordering = np.argsort(flat, kind="stable")
    flat = flat[ordering]
    table = table.take(pa.array(ordering))
    pieces = []
    for task in tasks:
        lo = np.searchsorted(flat, task.group * BINS + task.first_bin, side="left")
        hi = np.searchsorted(flat, task.group * BINS + task.last_bin, side="right")
        pieces.append(table.slice(int(lo), int(hi - lo)))
    return tuple(pieces)


def ranked(rows: pa.Table, task: WriterTask) -> pa.Table:
    """The task's rows, in order, exactly ranks [start, stop) of its group."""
    if rows.num_rows == 0:
        return rows
    rows = rows.sort_by([(KEY, "ascending"), ("sample_id", "ascending")])
    offset = task.start - task.base
    return rows.slice(offset, task.stop - task.start)
