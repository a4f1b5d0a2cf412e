"""Table-wide work as tasks of a backend (curate.engine.backend) over the table's Lance
fragments: scan, map, shuffle by key, and write columns back or delete rows per fragment
(the work on each fragment is in curate.table.fragments).

The driver only holds object references and small per-task results (counts, centroids,
fragment metadata); row data moves between workers through Ray's object store. Ray Data's
`groupby` does the same job but costs several seconds of fixed start-up per shuffle on a
small machine; a global stage needs several shuffles, so plain tasks are used here.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.parts import ROWADDR, Part, concat, num_rows
from curate.table.fragments import (
    delete_from_fragments,
    fragment_of,
    plan_compaction,
    read_fragments,
    run_compaction,
    set_columns,
)

#: Rows a scan task reads at most (several fragments may go to one task).
SCAN_ROWS = 262_144


def partition_of(values: pa.Array | pa.ChunkedArray, n: int) -> np.ndarray:
    """Partition number of each key, the same in every process (no salted hashing)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if pa.types.is_integer(values.type):
        keys = pc.fill_null(values, 0).to_numpy().astype(np.uint64)
        mixed = (keys * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(33)
        return (mixed % np.uint64(n)).astype(np.int64)
    text = pc.cast(values, pa.string()).to_pylist()
    return np.array([zlib.crc32((t or "").encode()) % n for t in text], dtype=np.int64)


# --- reading ------------------------------------------------------------------------------


def scan(backend, store, columns: list[str], filter: str | None = None,
         fn: Callable | None = None, args: tuple = (), dataset=None) -> list[Part]:
    """Read `columns` (and `_rowaddr`) of the rows matching `filter`, one task per group of
    fragments; `fn(table, *args)` runs on each part where it was read. `dataset`: the
    version to read (default: the latest)."""
    dataset = dataset if dataset is not None else store.dataset()
    if dataset is None:
        return []
    groups: list[list[int]] = [[]]
    rows = 0
    for fragment in dataset.get_fragments():
        count = fragment.count_rows()
        if groups[-1] and rows + count > SCAN_ROWS:
            groups.append([])
            rows = 0
        groups[-1].append(fragment.fragment_id)
        rows += count
    task = backend.task(read_fragments)
    return [task.remote(store.uri_of_table, dataset.version, store.storage_options, group,
                        columns, filter, fn, *args)
            for group in groups if group]


# --- mapping and shuffling ----------------------------------------------------------------


def _map_task(fn, table: pa.Table, *args):
    return fn(table, *args)


def map_parts(backend, parts: list[Part], fn: Callable, args: tuple = ()) -> list[Part]:
    """`fn(part, *args)` on every part, in tasks; results stay in the object store."""
    task = backend.task(_map_task)
    return [task.remote(fn, part, *args) for part in parts]


def _split_task(key, n: int, table: pa.Table):
    if n == 1:
        return table
    where = key(table) if callable(key) else partition_of(table[key], n)
    order = np.argsort(where, kind="stable")
    bounds = np.searchsorted(where[order], np.arange(n + 1))
    sorted_table = table.take(pa.array(order))
    return tuple(sorted_table.slice(int(bounds[i]), int(bounds[i + 1] - bounds[i]))
                 for i in range(n))


def _reduce_task(fn, count: int, *pieces_and_args):
    return fn(concat(pieces_and_args[:count]), *pieces_and_args[count:])


def _split(backend, parts: list[Part], key, n: int) -> list[list[Part]]:
    """Each part cut in `n` pieces by key: pieces[part][partition]."""
    split = backend.task(_split_task)
    pieces = [split.options(num_returns=n).remote(key, n, part) for part in parts]
    return [[p] for p in pieces] if n == 1 else pieces


def shuffle(backend, parts: list[Part], key: str | Callable[[pa.Table], np.ndarray], fn: Callable,
            args: tuple = (), n: int | None = None, returns: int = 1) -> list[Part]:
    """Bring the rows with equal `key` together and run `fn(partition, *args)` on each of
    `n` partitions. `key` is a column (hashed) or a function giving each row's partition
    number in [0, n). With `returns` > 1, fn returns that many tables and each partition
    gives a list of references."""
    n = n or backend.partitions()
    if not parts:
        return []
    pieces = _split(backend, parts, key, n)
    reduce = backend.task(_reduce_task, num_returns=returns) if returns > 1 \
        else backend.task(_reduce_task)
    return [reduce.remote(fn, len(pieces), *[p[i] for p in pieces], *args) for i in range(n)]


def _slice_task(table: pa.Table, rows: int):
    pieces = tuple(table.slice(i, rows) for i in range(0, table.num_rows, rows))
    return pieces if len(pieces) > 1 else pieces[0]


def blocks(backend, parts: list[Part], counts: list[int], rows: int) -> list[Part]:
    """The parts cut into blocks of at most `rows` rows (empty parts left out)."""
    cut = backend.task(_slice_task)
    out: list[Part] = []
    for part, count in zip(parts, counts):
        if count == 0:
            continue
        pieces = -(-count // rows)
        if pieces == 1:
            out.append(part)
        else:
            out += cut.options(num_returns=pieces).remote(part, rows)
    return out


def run_task(backend, fn: Callable, *args, **options):
    """`fn(*args)` as one task (e.g. training on a sample); returns its reference."""
    return backend.task(fn, **options).remote(*args)


# --- writing columns back -----------------------------------------------------------------


class _FragmentGroups:
    """The table's fragments dealt into groups, one task each, and the rows of parts sent
    to the group that holds their fragment."""

    def __init__(self, backend, store, n: int | None = None):
        self.backend = backend
        self.dataset = store.dataset()
        ids = [f.fragment_id for f in self.dataset.get_fragments()]
        n = max(1, min(n or backend.partitions(), len(ids)))
        self.groups = [ids[i::n] for i in range(n)]
        self.owner = np.zeros(max(ids, default=0) + 1, dtype=np.int64)
        for g, group in enumerate(self.groups):
            self.owner[group] = g

    def pieces(self, parts: list[Part]) -> list[list[Part]]:
        owner = self.owner

        def by_owner(table: pa.Table) -> np.ndarray:
            return owner[fragment_of(table)] if table.num_rows else np.zeros(0, np.int64)

        return _split(self.backend, parts, by_owner, len(self.groups))


def write_columns(backend, store, parts: list[Part], schema: pa.Schema,
                  defaults: dict | None = None, n: int | None = None,
                  keep: bool = False) -> int:
    """Set `schema`'s columns on every row from `parts` (rows with `_rowaddr` and those
    columns); rows missing from `parts` get the default (or null), or with `keep` their
    values stay. One task per group of fragments rewrites its fragments' column files;
    the driver commits their metadata once. Returns the new version."""
    groups = _FragmentGroups(backend, store, n)
    pieces = groups.pieces(parts)
    write = backend.task(set_columns)
    version = groups.dataset.version
    refs = [write.remote(store.uri_of_table, version, store.storage_options, group,
                         schema, defaults or {}, keep, *[p[g] for p in pieces])
            for g, group in enumerate(groups.groups)]
    updated, fields = [], set()
    for result in backend.gather(refs):
        for metadata, modified in result:
            updated.append(metadata)
            fields.update(modified)
    if not updated:
        return version
    return store.commit_update(updated, sorted(fields), version)


def delete_rows(backend, store, parts: list[Part], why: str) -> int | None:
    """Delete the rows of `parts` (by `_rowaddr`), one commit; returns the new version, or
    None when there was nothing to delete."""
    groups = _FragmentGroups(backend, store)
    pieces = groups.pieces(parts)
    delete = backend.task(delete_from_fragments)
    version = groups.dataset.version
    refs = [delete.remote(store.uri_of_table, version, store.storage_options, group,
                          *[p[g] for p in pieces])
            for g, group in enumerate(groups.groups)]
    updated, removed = [], []
    for fragments, gone in backend.gather(refs):
        updated += fragments
        removed += gone
    if not updated and not removed:
        return None
    return store.commit_delete(updated, removed, why, version)


def _duplicates_part(part: pa.Table) -> pa.Table:
    """The rows of `part` whose sample_id an earlier row (lower address) already has."""
    if part.num_rows == 0:
        return part
    order = pc.sort_indices(part, [("sample_id", "ascending"), (ROWADDR, "ascending")])
    ordered = part.take(order)
    ids = ordered["sample_id"].to_numpy(zero_copy_only=False)
    repeat = np.zeros(len(ids), dtype=bool)
    repeat[1:] = ids[1:] == ids[:-1]
    return ordered.filter(pa.array(repeat))


def remove_duplicate_rows(backend, store) -> int:
    """Delete every second (third, ...) row of a sample_id, keeping the first written;
    returns how many went. Rows with equal ids meet in a shuffle by id, so no process
    holds all ids."""
    parts = scan(backend, store, ["sample_id"])
    if not parts:
        return 0
    extra = shuffle(backend, parts, "sample_id", _duplicates_part)
    count = sum(backend.gather(map_parts(backend, extra, num_rows)))
    if count:
        delete_rows(backend, store, extra, f"{count} duplicate sample_id rows")
    return count


# --- compaction -----------------------------------------------------------------------------


def compact(backend, store) -> int:
    """Merge the small fragments that incremental commits leave into large ones, one task
    per group of fragments (the rewriting never runs here); one commit. Returns the number
    of compaction tasks."""
    dataset, plan = plan_compaction(store)
    if not plan:
        return 0
    task = backend.task(run_compaction)
    refs = [task.remote(store.uri_of_table, store.storage_options, t) for t in plan]
    store.commit_compaction(dataset, backend.gather(refs))
    return len(plan)
