"""Table-wide work as Ray tasks over the table's Lance fragments: scan, map, shuffle by key,
and write columns back per fragment.

The driver only holds object references and small per-task results (counts, centroids,
fragment metadata); row data moves between workers through Ray's object store. Ray Data's
`groupby` does the same job but costs several seconds of fixed start-up per shuffle on a
small machine; a global stage needs several shuffles, so plain tasks are used here.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.parts import ROWADDR, Part, aligned_columns, concat, num_rows

#: Rows a scan task reads at most (several fragments may go to one task).
SCAN_ROWS = 262_144


def _remote(fn, **options):
    from curate.engine import local_stream as local
    if local.active():  # a run without Ray: the task is called here (curate.engine.local_stream)
        return local.InlineTask(fn, options.get("num_returns", 1))
    import ray

    return ray.remote(**options)(fn) if options else ray.remote(fn)


def partitions() -> int:
    """Shuffle partitions: about two per CPU of the cluster (one when tasks run inline)."""
    from curate.engine import local_stream as local
    if local.active():
        return 1
    import ray

    return max(2, int(ray.cluster_resources().get("CPU", 1)) * 2)


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


def _scan_task(uri: str, version: int, storage_options: dict | None, fragment_ids: list[int],
               columns: list[str], filter: str | None, fn, *args) -> pa.Table:
    import lance

    dataset = lance.dataset(uri, version=version, storage_options=storage_options)
    fragments = [dataset.get_fragment(f) for f in fragment_ids]
    table = dataset.scanner(columns=columns, filter=filter, fragments=fragments,
                            with_row_address=True).to_table()
    return fn(table, *args) if fn is not None else table


def scan(store, columns: list[str], filter: str | None = None,
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
    task = _remote(_scan_task)
    return [task.remote(store.uri_of_table, dataset.version, store.storage_options, group,
                        columns, filter, fn, *args)
            for group in groups if group]


def fragment_of(table: pa.Table) -> np.ndarray:
    return (table[ROWADDR].to_numpy() >> np.uint64(32)).astype(np.int64)


# --- mapping and shuffling ----------------------------------------------------------------


def _map_task(fn, table: pa.Table, *args):
    return fn(table, *args)


def map_parts(parts: list[Part], fn: Callable, args: tuple = ()) -> list[Part]:
    """`fn(part, *args)` on every part, in tasks; results stay in the object store."""
    task = _remote(_map_task)
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


def _split(parts: list[Part], key, n: int) -> list[list[Part]]:
    """Each part cut in `n` pieces by key: pieces[part][partition]."""
    split = _remote(_split_task)
    pieces = [split.options(num_returns=n).remote(key, n, part) for part in parts]
    return [[p] for p in pieces] if n == 1 else pieces


def shuffle(parts: list[Part], key: str | Callable[[pa.Table], np.ndarray], fn: Callable,
            args: tuple = (), n: int | None = None, returns: int = 1) -> list[Part]:
    """Bring the rows with equal `key` together and run `fn(partition, *args)` on each of
    `n` partitions. `key` is a column (hashed) or a function giving each row's partition
    number in [0, n). With `returns` > 1, fn returns that many tables and each partition
    gives a list of references."""
    n = n or partitions()
    if not parts:
        return []
    pieces = _split(parts, key, n)
    reduce = _remote(_reduce_task, num_returns=returns) if returns > 1 \
        else _remote(_reduce_task)
    return [reduce.remote(fn, len(pieces), *[p[i] for p in pieces], *args) for i in range(n)]


def _slice_task(table: pa.Table, rows: int):
    pieces = tuple(table.slice(i, rows) for i in range(0, table.num_rows, rows))
    return pieces if len(pieces) > 1 else pieces[0]


def blocks(parts: list[Part], counts: list[int], rows: int) -> list[Part]:
    """The parts cut into blocks of at most `rows` rows (empty parts left out)."""
    cut = _remote(_slice_task)
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


def gather(refs: list[Part]) -> list:
    """The results of small tasks (counts, centroids), on the driver."""
    from curate.engine import local_stream as local
    if local.active():
        return list(refs)
    import ray

    return ray.get(list(refs))


def put(value):
    from curate.engine import local_stream as local
    if local.active():
        return value
    import ray

    return ray.put(value)


def run_task(fn: Callable, *args, **options):
    """`fn(*args)` as one task (e.g. training on a sample); returns its reference."""
    return _remote(fn, **options).remote(*args)


# --- writing columns back -----------------------------------------------------------------


def _write_task(uri: str, version: int, storage_options: dict | None,
                fragment_ids: list[int], schema: pa.Schema, defaults: dict,
                *pieces) -> list[tuple[str, list[int]]]:
    import lance

    values = concat(pieces)
    dataset = lance.dataset(uri, version=version, storage_options=storage_options)
    where = fragment_of(values) if values.num_rows else None
    out = []
    for fid in fragment_ids:
        fragment = dataset.get_fragment(fid)
        ids = fragment.to_table(columns=[], with_row_id=True)["_rowid"]
        mine = values.filter(pa.array(where == fid)) if where is not None else values
        # without stable row ids a row's id is its address
        full = {"_rowid": ids, **aligned_columns(mine, ids, schema, defaults)}
        metadata, fields = fragment.update_columns(pa.table(full), left_on="_rowid")
        out.append((json.dumps(metadata.to_json()), list(fields)))
    return out


class _FragmentGroups:
    """The table's fragments dealt into groups, one task each, and the rows of parts sent
    to the group that holds their fragment."""

    def __init__(self, store, n: int | None = None):
        self.dataset = store.dataset()
        ids = [f.fragment_id for f in self.dataset.get_fragments()]
        n = max(1, min(n or partitions(), len(ids)))
        self.groups = [ids[i::n] for i in range(n)]
        self.owner = np.zeros(max(ids, default=0) + 1, dtype=np.int64)
        for g, group in enumerate(self.groups):
            self.owner[group] = g

    def pieces(self, parts: list[Part]) -> list[list[Part]]:
        owner = self.owner

        def by_owner(table: pa.Table) -> np.ndarray:
            return owner[fragment_of(table)] if table.num_rows else np.zeros(0, np.int64)

        return _split(parts, by_owner, len(self.groups))


def write_columns(store, parts: list[Part], schema: pa.Schema,
                  defaults: dict | None = None, n: int | None = None) -> int:
    """Set `schema`'s columns on every row from `parts` (rows with `_rowaddr` and those
    columns); rows missing from `parts` get the default (or null). One task per group of
    fragments rewrites its fragments' column files; the driver commits their metadata once.
    Returns the new version."""
    groups = _FragmentGroups(store, n)
    pieces = groups.pieces(parts)
    write = _remote(_write_task)
    version = groups.dataset.version
    refs = [write.remote(store.uri_of_table, version, store.storage_options, group,
                         schema, defaults or {}, *[p[g] for p in pieces])
            for g, group in enumerate(groups.groups)]
    updated, fields = [], set()
    for result in gather(refs):
        for metadata, modified in result:
            updated.append(metadata)
            fields.update(modified)
    return store.commit_update(updated, sorted(fields), version)


def _delete_task(uri: str, version: int, storage_options: dict | None,
                 fragment_ids: list[int], *pieces) -> tuple[list[str], list[int]]:
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


def delete_rows(store, parts: list[Part], why: str) -> int | None:
    """Delete the rows of `parts` (by `_rowaddr`), one commit; returns the new version, or
    None when there was nothing to delete."""
    groups = _FragmentGroups(store)
    pieces = groups.pieces(parts)
    delete = _remote(_delete_task)
    version = groups.dataset.version
    refs = [delete.remote(store.uri_of_table, version, store.storage_options, group,
                          *[p[g] for p in pieces])
            for g, group in enumerate(groups.groups)]
    updated, removed = [], []
    for fragments, gone in gather(refs):
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


def remove_duplicate_rows(store) -> int:
    """Delete every second (third, ...) row of a sample_id, keeping the first written;
    returns how many went. Rows with equal ids meet in a shuffle by id, so no process
    holds all ids."""
    parts = scan(store, ["sample_id"])
    if not parts:
        return 0
    extra = shuffle(parts, "sample_id", _duplicates_part)
    count = sum(gather(map_parts(extra, num_rows)))
    if count:
        delete_rows(store, extra, f"{count} duplicate sample_id rows")
    return count


# --- compaction -----------------------------------------------------------------------------


def _compact_task(uri: str, storage_options: dict | None, task_json: str) -> str:
    import lance
    from lance.optimize import CompactionTask

    task = CompactionTask.from_json(task_json)
    dataset = lance.dataset(uri, version=task.read_version, storage_options=storage_options)
    return task.execute(dataset).json()


def compact(store) -> int:
    """Merge the small fragments that incremental commits leave into large ones, one task
    per group of fragments (the rewriting never runs here); one commit. Returns the number
    of compaction tasks."""
    from lance.optimize import Compaction, CompactionOptions, RewriteResult

    dataset = store.dataset()
    plan = Compaction.plan(dataset, CompactionOptions())
    if plan.num_tasks() == 0:
        return 0
    task = _remote(_compact_task)
    refs = [task.remote(store.uri_of_table, store.storage_options, t.json())
            for t in plan.tasks]
    Compaction.commit(dataset, [RewriteResult.from_json(r) for r in gather(refs)])
    return plan.num_tasks()
