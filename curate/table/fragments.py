"""The table's fragments, where workers read and write them: new rows as fragments, columns
set on existing fragments, rows deleted, compaction tasks. Each function here runs on a
worker (or inline) and returns metadata; the driver commits it through `Store`
(curate.table.store). The engine decides where these run (curate.engine.tasks)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.parts import ROWADDR, aligned_columns, concat
from curate.stage import Stage

#: Prefix of the per-stage timing columns (summed by the writers, never stored).
TIMING_PREFIX = "_seconds:"
#: Prefix of the columns naming the worker of a pool that made each row (counted by the
#: writers, never stored); the pool is named by its first stage.
WORKER_PREFIX = "_worker:"


class FragmentWriter:
    """The last step of the stream: a worker writes its rows as a Lance fragment of the
    table and hands back only the fragment's metadata (and the stages' timings), which
    the driver commits."""

    def __init__(self, uri: str, schema: pa.Schema, storage_options: dict | None):
        self.uri = uri
        self.schema = schema
        self.storage_options = storage_options

    def __call__(self, batch: pa.Table) -> pa.Table:
        from lance.fragment import write_fragments

        timing = [c for c in batch.column_names if c.startswith(TIMING_PREFIX)]
        seconds = {c[len(TIMING_PREFIX):]: pc.sum(batch[c]).as_py() or 0.0 for c in timing}
        # rows each stamped stage computed (it stamps those, not the rows it skipped)
        prefix = Stage.STAMP_PREFIX
        computed = {c[len(prefix):]: len(batch[c]) - batch[c].null_count
                    for c in batch.column_names if c.startswith(prefix)}
        tagged = [c for c in batch.column_names if c.startswith(WORKER_PREFIX)]
        workers = {c[len(WORKER_PREFIX):]: pc.unique(batch[c].combine_chunks().cast(
            pa.string())).drop_null().to_pylist() for c in tagged}
        rows = conform(batch.drop_columns(timing + tagged), self.schema)
        fragments = write_fragments(rows, self.uri, schema=self.schema,
                                    storage_options=self.storage_options)
        return pa.table({
            "fragments": [json.dumps([json.dumps(f.to_json()) for f in fragments])],
            "rows": pa.array([rows.num_rows], pa.int64()),
            "seconds": [json.dumps(seconds)],
            "computed": [json.dumps(computed)],
            "workers": [json.dumps(workers)],
        })


def conform(rows: pa.Table, schema: pa.Schema) -> pa.Table:
    """`rows` in the table's schema: its columns in order, the ones rows lack as nulls
    (columns of global stages, filled in later)."""
    columns = []
    for field in schema:
        if field.name in rows.column_names:
            columns.append(rows[field.name].cast(field.type))
        else:
            columns.append(pa.nulls(rows.num_rows, field.type))
    return pa.Table.from_arrays(columns, schema=schema)


def read_fragments(uri: str, version: int, storage_options: dict | None,
                   fragment_ids: list[int], columns: list[str], filter: str | None, fn,
                   *args) -> pa.Table:
    """`columns` and `_rowaddr` of the rows of these fragments that match `filter`;
    `fn(table, *args)` when given, where the rows were read."""
    import lance

    dataset = lance.dataset(uri, version=version, storage_options=storage_options)
    fragments = [dataset.get_fragment(f) for f in fragment_ids]
    table = dataset.scanner(columns=columns, filter=filter, fragments=fragments,
                            with_row_address=True).to_table()
    return fn(table, *args) if fn is not None else table


def fragment_of(table: pa.Table) -> np.ndarray:
    """The fragment id of each row, from its `_rowaddr`."""
    return (table[ROWADDR].to_numpy() >> np.uint64(32)).astype(np.int64)


def set_columns(uri: str, version: int, storage_options: dict | None,
                fragment_ids: list[int], schema: pa.Schema, defaults: dict, keep: bool,
                *pieces) -> list[tuple[str, list[int]]]:
    """Set `schema`'s columns on every row of these fragments from `pieces` (rows with
    `_rowaddr`); rows missing from them get the default or null, or with `keep` their
    values stay (and fragments with no row in `pieces` are left alone). Returns each
    rewritten fragment's new metadata and the fields it rewrote."""
    import lance

    values = concat(pieces)
    dataset = lance.dataset(uri, version=version, storage_options=storage_options)
    where = fragment_of(values) if values.num_rows else None
    out = []
    for fid in fragment_ids:
        fragment = dataset.get_fragment(fid)
        mine = values.filter(pa.array(where == fid)) if where is not None else values
        if keep and mine.num_rows == 0:
            continue
        present = [f.name for f in schema if f.name in dataset.schema.names] if keep else []
        current = fragment.to_table(columns=present, with_row_id=True)
        # without stable row ids a row's id is its address
        ids = current["_rowid"]
        full = {"_rowid": ids, **aligned_columns(mine, ids, schema, defaults)}
        if keep:
            given = pc.is_in(ids, value_set=mine[ROWADDR])
            for name in present:
                full[name] = pc.if_else(given, full[name], current[name].cast(
                    schema.field(name).type)).combine_chunks()
        metadata, fields = fragment.update_columns(pa.table(full), left_on="_rowid")
        out.append((json.dumps(metadata.to_json()), list(fields)))
    return out


def delete_from_fragments(uri: str, version: int, storage_options: dict | None,
                          fragment_ids: list[int], *pieces) -> tuple[list[str], list[int]]:
    """Delete the rows of `pieces` (by `_rowaddr`) from these fragments; returns the
    updated fragments' metadata and the ids of fragments left empty."""
    import lance

    rows = concat(pieces)
    if rows.num_rows == 0:
        return [], []
    dataset = lance.dataset(uri, version=version, storage_options=storage_options)
    where = fragment_of(rows)
    offsets = (rows[ROWADDR].to_numpy() & np.uint64(0xFFFFFFFF)).astype(np.int64)
    updated, removed = [], []
    for fid in fragment_ids:
        mine = offsets[where == fid]
        if mine.size == 0:
            continue
        metadata = dataset.get_fragment(fid).delete_rows(sorted(mine.tolist()))
        if metadata is None:
            removed.append(fid)
        else:
            updated.append(json.dumps(metadata.to_json()))
    return updated, removed


def run_compaction(uri: str, storage_options: dict | None, task_json: str) -> str:
    """One compaction task of `plan_compaction`; its result for `Store.commit_compaction`."""
    import lance
    from lance.optimize import CompactionTask

    task = CompactionTask.from_json(task_json)
    dataset = lance.dataset(uri, version=task.read_version, storage_options=storage_options)
    return task.execute(dataset).json()


def plan_compaction(store) -> tuple[object, list[str]]:
    """The table's dataset and its compaction tasks (as JSON, for `run_compaction`): the
    small fragments that incremental commits leave, grouped to be merged."""
    from lance.optimize import Compaction, CompactionOptions

    dataset = store.dataset()
    plan = Compaction.plan(dataset, CompactionOptions())
    return dataset, [t.json() for t in plan.tasks]
