"""What a run has to read: the source's inputs, listed by workers, each input once, less
those the table already holds finished rows of. Decided per input, on the cluster: the
listing and the table's ids meet in shuffle partitions keyed by input_id, so no process
holds every id."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.engine.tasks import map_parts, run_task, scan, shuffle
from curate.errors import CurateError, RunError
from curate.media.decode import TRANSIENT_CODES
from curate.parts import ROWADDR, Part, num_rows
from curate.stage import Source, first_of_each_input

#: Tag of the table's rows in the shuffle that meets them with the listing.
_STATE = "_state"


@dataclass
class Pending:
    """Inputs to read (parts of the listing) and the rows to delete before they are read
    again (an input's old rows, when its rows are redone)."""

    parts: list[Part]
    counts: list[int]
    stale: list[Part]

    @property
    def rows(self) -> int:
        return sum(self.counts)


def done_filter(row_stages_hash: str, retry: tuple[str, ...] = (),
                redo: str | None = None) -> str:
    """Lance filter of the rows that are finished: made by the stages that decide the rows
    (curate.plan.shaping), not failed in a way worth retrying (a transient error, or one
    of the codes in `retry`), and not matching `redo` (rows whose input is read again
    whole for a later stage: curate.engine.incremental.redo_filter)."""
    transient = " OR ".join(f"error LIKE '{code}:%'" for code in (*TRANSIENT_CODES, *retry))
    done = f"row_stages_hash = '{row_stages_hash}' AND (error IS NULL OR NOT ({transient}))"
    return f"{done} AND NOT ({redo})" if redo else done


def _tag(part: pa.Table, state: str) -> pa.Table:
    columns = [c for c in ("input_id", "input_rows", ROWADDR) if c in part.column_names]
    return part.select(columns).append_column(
        _STATE, pa.array([state] * part.num_rows, pa.string()))


def _meet(table: pa.Table) -> tuple[pa.Table, pa.Table]:
    """One partition: (inputs to read, `_rowaddr` of the old rows of those inputs)."""
    if table.num_rows == 0 or "_order" not in table.column_names:
        return pa.table({}), pa.table({ROWADDR: pa.array([], pa.uint64())})

    state = table[_STATE] if _STATE in table.column_names else pa.nulls(table.num_rows)
    listed_mask = pc.is_null(state)
    listed = first_of_each_input(table.filter(listed_mask).drop_columns(
        [c for c in (_STATE, ROWADDR, "input_rows") if c in table.column_names]))
    if ROWADDR not in table.column_names:
        return listed, pa.table({ROWADDR: pa.array([], pa.uint64())})
    finished = table.filter(pc.fill_null(pc.equal(state, "done"), False))
    done = _complete_inputs(finished)
    todo = listed.filter(pc.invert(pc.is_in(listed["input_id"], value_set=done)))
    old = table.filter(pc.is_valid(state))  # finished rows of cut-off inputs are stale too
    old = old.filter(pc.invert(pc.is_in(old["input_id"], value_set=done)))
    old = old.filter(pc.is_in(old["input_id"], value_set=todo["input_id"]))
    return todo, old.select([ROWADDR])


def _complete_inputs(finished: pa.Table) -> pa.Array:
    """Inputs all of whose rows are finished (a run cut off between the commits of one
    input's rows leaves it incomplete: it is read again)."""
    if finished.num_rows == 0:
        return pa.array([], pa.string())
    counts = finished.group_by("input_id").aggregate([("input_id", "count"),
                                                      ("input_rows", "max")])
    whole = pc.greater_equal(counts["input_id_count"],
                             pc.fill_null(counts["input_rows_max"], 1))
    return counts.filter(whole)["input_id"]


def _listed_count(part: pa.Table, entries: int) -> np.ndarray:
    indices = part["_order"].to_numpy() >> 40 if part.num_rows else np.zeros(0, np.int64)
    return np.bincount(indices, minlength=entries)


def _list_unit(source: Source, unit: dict) -> pa.Table:
    # a task runs a function, not a bound method
    return source.list_entry(unit)


def pending_inputs(backend, source: Source, store, row_stages_hash: str,
                   retry: tuple[str, ...] = (), redo: str | None = None,
                   listing: list[pa.Table] | None = None) -> Pending:
    """List the inputs in tasks and find those with no finished rows in the table (rows
    with an error whose code is in `retry`, or matching `redo`, are not finished).
    `listing`: the inputs as the source lists them, listed already (a sample of them:
    curate.forecast), instead of the source's listing."""
    if listing is not None:
        parts = [backend.put(table) for table in listing]
    else:
        parts = list(_listed(backend, source))
    if store.dataset() is not None and store.dataset().count_rows():
        finished = done_filter(row_stages_hash, retry, redo)
        parts += scan(backend, store, ["input_id", "input_rows"], finished, _tag, ("done",))
        parts += scan(backend, store, ["input_id"], f"NOT ({finished}) OR row_stages_hash IS NULL",
                      _tag, ("stale",))
    met = shuffle(backend, parts, "input_id", _meet, returns=2)
    todo = [pair[0] for pair in met]
    stale = [pair[1] for pair in met]
    return Pending(todo, backend.gather(map_parts(backend, todo, num_rows)), stale)


def _listed(backend, source: Source) -> list[Part]:
    """The source's listing, in tasks; an entry that lists nothing fails here."""
    units = source.list_entries()  # unusable entries fail here, before any work
    listed = [run_task(backend, _list_unit, source, unit) for unit in units]
    entries = source.entry_count(units)
    counted = map_parts(backend, listed, _listed_count, (entries,))
    counts = sum(unwrap(lambda: backend.gather(counted)), np.zeros(entries, dtype=np.int64))
    for index in sorted({unit["index"] for unit in units}):
        if counts[index] == 0:
            raise RunError(source.empty_entry(index))
    return listed


def unwrap(call):
    """Run `call`; a curate error raised inside a task is raised here as itself."""
    try:
        return call()
    except CurateError:
        raise
    except Exception as exc:  # Ray's RayTaskError carries the task's own error as `cause`
        cause = getattr(exc, "cause", None)
        if isinstance(cause, CurateError):
            raise cause from None
        raise

