"""Rows in parts: the words global stages and the engine share. A global stage reads the
table in parts (Arrow tables holding `_rowaddr`, each a reference where the engine runs
on Ray) and returns its new columns as a `GlobalResult`; `MemoryExecutor` runs a global
stage over one table in this process (unit tests and single calls)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

#: A part: a pa.Table, or where the engine runs on Ray a reference to one in its object store.
Part = Any

#: Row address column added by a scan: fragment id in the high 32 bits, offset below.
ROWADDR = "_rowaddr"


def concat(tables: Sequence[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t is not None]
    if not tables:
        return pa.table({})
    nonempty = [t for t in tables if t.num_rows] or tables[:1]
    return pa.concat_tables(nonempty, promote_options="default")


def aligned_columns(values: pa.Table, addresses: pa.Array | pa.ChunkedArray,
                    schema: pa.Schema, defaults: dict) -> dict[str, pa.Array]:
    """`schema`'s columns for the rows at `addresses`, taken from `values` (rows with
    `_rowaddr`); rows missing from `values` get the default or null."""
    position = pc.index_in(addresses, value_set=values[ROWADDR]) if values.num_rows else None
    out = {}
    for column_field in schema:
        if position is not None and column_field.name in values.column_names:
            column = pc.take(values[column_field.name], position)
        else:
            column = pa.nulls(len(addresses), column_field.type)
        if column_field.name in defaults:
            column = pc.fill_null(column, defaults[column_field.name])
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        out[column_field.name] = column.cast(column_field.type)
    return out


@dataclass
class GlobalResult:
    """New columns of a global stage: `parts` hold `_rowaddr` and the columns of `schema`;
    rows not in them get `defaults` (or null), or keep their values (`keep`)."""

    parts: list[Part]
    schema: pa.Schema
    defaults: dict[str, Any] = field(default_factory=dict)
    #: Rows not in `parts` keep the values they have (no defaults; nothing to write when
    #: `parts` is empty).
    keep: bool = False


class MemoryExecutor:
    """A global stage's executor over one Arrow table in this process: one partition; row
    addresses are row numbers. (A run's global stages use the engine's executor.)"""

    def __init__(self, table: pa.Table, alive: pa.Array | pa.ChunkedArray):
        self.table = table
        self.alive = alive

    def scan(self, columns: list[str], fn: Callable | None = None, *args) -> list[Part]:
        table = self.table.select([c for c in columns if c in self.table.column_names])
        table = table.append_column(ROWADDR, pa.array(np.arange(table.num_rows, dtype=np.uint64)))
        alive = pc.fill_null(self.alive, False)
        part = table if pc.all(alive).as_py() else table.filter(alive)  # filter copies
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
        if result.keep and not result.parts:
            return {name: self.table[name].combine_chunks() for name in result.schema.names}
        out = aligned_columns(concat(result.parts), rows, result.schema, result.defaults)
        if result.keep:
            present = np.zeros(self.table.num_rows, bool)
            present[concat(result.parts)[ROWADDR].to_numpy()] = True
            out = {name: pc.if_else(pa.array(present), values,
                                    self.table[name].combine_chunks())
                   for name, values in out.items()}
        return out


def num_rows(part: pa.Table) -> int:
    return part.num_rows
