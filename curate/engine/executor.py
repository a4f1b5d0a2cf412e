"""Where a global stage's work runs: in tasks on the cluster over the table's fragments
(`ClusterExecutor`), or in this process over one Arrow table (`LocalExecutor`, for unit
tests and single calls). A global stage is written once against this small interface:

    parts = ex.scan(columns, fn)          # the alive rows, in parts, each with `_rowaddr`
    parts = ex.map(parts, fn, *args)      # fn(part, *args) per part
    parts = ex.shuffle(parts, key, fn)    # rows with equal key meet in one fn(partition)
    values = ex.gather(parts)             # small results (counts, centroids) here
    ref = ex.task(fn, *args)              # one task (e.g. k-means on a sample)

and returns a `GlobalResult`: parts holding `_rowaddr` and its new columns. Arguments that
are references (`ex.put`, `ex.task`) are resolved before `fn` sees them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.engine.tasks import ROWADDR, Part, aligned_columns, concat


@dataclass
class GlobalResult:
    """New columns of a global stage: `parts` hold `_rowaddr` and the columns of `schema`;
    rows not in them get `defaults` (or null)."""

    parts: list[Part]
    schema: pa.Schema
    defaults: dict[str, Any] = field(default_factory=dict)


class LocalExecutor:
    """Everything in this process; one partition. Row addresses are row numbers."""

    def __init__(self, table: pa.Table, alive: pa.Array | pa.ChunkedArray):
        self.table = table
        self.alive = alive

    def scan(self, columns: list[str], fn: Callable | None = None, *args) -> list[Part]:
        table = self.table.select([c for c in columns if c in self.table.column_names])
        table = table.append_column(ROWADDR, pa.array(np.arange(table.num_rows, dtype=np.uint64)))
        part = table.filter(pc.fill_null(self.alive, False))
        return [fn(part, *args) if fn is not None else part]

    def map(self, parts: list[Part], fn: Callable, *args) -> list[Part]:
        return [fn(part, *args) for part in parts]

    def shuffle(self, parts: list[Part], key, fn: Callable, *args) -> list[Part]:
        return [fn(concat(parts), *args)]

    def gather(self, parts: list[Part]) -> list:
        return list(parts)

    def task(self, fn: Callable, *args) -> Part:
        return fn(*args)

    def put(self, value):
        return value

    def columns(self, result: GlobalResult) -> dict[str, pa.Array]:
        """The result as full columns aligned with the table."""
        rows = pa.array(np.arange(self.table.num_rows, dtype=np.uint64))
        return aligned_columns(concat(result.parts), rows, result.schema, result.defaults)


class ClusterExecutor:
    """Tasks on the Ray cluster over the table's fragments; `alive` is a Lance filter."""

    def __init__(self, store, alive_filter: str | None):
        self.store = store
        self.alive_filter = alive_filter

    def scan(self, columns: list[str], fn: Callable | None = None, *args) -> list[Part]:
        from curate.engine.tasks import scan

        have = set(self.store.dataset().schema.names)
        return scan(self.store, [c for c in columns if c in have], self.alive_filter, fn, args)

    def map(self, parts: list[Part], fn: Callable, *args) -> list[Part]:
        from curate.engine.tasks import map_parts

        return map_parts(parts, fn, args)

    def shuffle(self, parts: list[Part], key, fn: Callable, *args) -> list[Part]:
        from curate.engine.tasks import shuffle

        return shuffle(parts, key, fn, args)

    def gather(self, parts: list[Part]) -> list:
        from curate.engine.tasks import gather

        return gather(parts)

    def task(self, fn: Callable, *args) -> Part:
        from curate.engine.tasks import run_task

        return run_task(fn, *args)

    def put(self, value):
        from curate.engine.tasks import put

        return put(value)

    def write(self, result: GlobalResult) -> int:
        """Commit the result's columns, one commit; returns the new table version."""
        from curate.engine.tasks import write_columns

        return write_columns(self.store, result.parts, result.schema, result.defaults)


def _float_keys(part: pa.Table, column: str) -> np.ndarray:
    """float32 values as uint32 keys in the same order (nulls and NaN left out)."""
    values = pc.drop_null(part[column]).to_numpy(zero_copy_only=False).astype(np.float32)
    values = values[~np.isnan(values)]
    bits = values.view(np.uint32)
    return np.where(bits >> 31, ~bits, bits | np.uint32(1 << 31)).astype(np.uint32)


def _key_histogram(part: pa.Table, column: str, high: int | None) -> np.ndarray:
    keys = _float_keys(part, column) if part.num_rows else np.zeros(0, np.uint32)
    if high is None:
        return np.bincount(keys >> 16, minlength=1 << 16)
    return np.bincount(keys[(keys >> 16) == high] & 0xFFFF, minlength=1 << 16)


def kth_largest(ex, parts: list[Part], column: str, k: int) -> float:
    """The k-th largest float32 value of `column` over all parts, exactly, from two rounds
    of 65,536-bin histograms (no process sees the column whole)."""
    def pick(counts: np.ndarray, wanted: int) -> tuple[int, int]:
        from_top = np.cumsum(counts[::-1])
        index = int(np.searchsorted(from_top, wanted))
        above = int(from_top[index - 1]) if index else 0
        return len(counts) - 1 - index, wanted - above

    high_counts = sum(ex.gather(ex.map(parts, _key_histogram, column, None)))
    high, rest = pick(high_counts, k)
    low_counts = sum(ex.gather(ex.map(parts, _key_histogram, column, high)))
    low, _ = pick(low_counts, rest)
    key = np.uint32((high << 16) | low)
    bits = key & np.uint32(0x7FFFFFFF) if key >> 31 else ~key
    return float(np.array([bits], dtype=np.uint32).view(np.float32)[0])
