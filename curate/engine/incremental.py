"""Each row stage's columns stay valid until that stage changes. Every row stage after the
shaping ones (curate.plan.shaping) stamps the rows it computes with what computed them
(curate.plan.stamps: ROW/VERDICT). A run then, per stage and in stage order:

- decides verdicts again where only the VERDICT part differs (a moved threshold): from the
  stored scores, in tasks over fragments, no decode, no model;
- computes the stage's columns where the ROW part differs or is missing, on the rows it
  must compute (every row, or for a stage that skips dropped rows, the rows alive when
  they come to it: rows a looser threshold brought back are computed now, and only they),
  reading the media again by `uri` through the source where the stage needs pixels.

Columns are merged fragment by fragment by the tasks that computed them, one commit per
stage; no row leaves its fragment and the driver holds counts and metadata only. Where the
source cannot read a stored row again (a clip is a piece of its video), the rows a stage
must compute make their inputs be read again whole instead (`redo_filter`); a video's
clips are read again one by one, by their span (`split_clips`)."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from curate.engine.tasks import blocks, map_parts, scan, write_columns
from curate.engine.workers import unstamped
from curate.parts import ROWADDR, concat, num_rows
from curate.plan import frame_feeders, readers, shaping, skip_verdicts
from curate.stage import FanOut, ModelStage, RowStage, ScoreFilter, Source, Stage, cuts_clips


def _quote(column: str) -> str:
    return f"`{column}`"


def _row_part(stamp: str) -> str:
    return stamp.split("/", 1)[0]


def _alive(chain: list[Stage], index: int, have: set[str]) -> str | None:
    """Lance filter of the rows a skipping stage must see (None: every row)."""
    verdicts = skip_verdicts(chain, index)
    if verdicts is None:
        return None
    return " AND ".join(f"{_quote(c)} IS NULL" for c in verdicts if c in have) or "TRUE"


def needs_filter(chain: list[Stage], index: int, stamp: str, have: set[str]) -> str:
    """Lance filter of the rows `chain[index]` must compute: its ROW stamp differs or is
    missing, and (for a stage that skips dropped rows) the row is alive when it comes to it."""
    column = _quote(chain[index].stamp_column)
    stale = f"({column} IS NULL OR {column} NOT LIKE '{_row_part(stamp)}/%')" \
        if chain[index].stamp_column in have else "TRUE"
    alive = _alive(chain, index, have)
    return stale if alive is None else f"{stale} AND ({alive})"


def makers(chain: list[Stage]) -> list[Stage] | None:
    """The stages that read a stored row's media again, one row at a time: the source
    alone, or the source and the one fan-out stage that made the row (a clip read again
    by its span); None where they cannot (each row's input is read again whole)."""
    source, first = chain[0], shaping(chain)
    if not isinstance(source, Source):
        return None
    if first == 1:
        return [source] if source.reloads_rows else None
    maker = chain[1]
    if first == 2 and isinstance(maker, FanOut) and maker.reloads_rows_from(source):
        return [source, maker]
    return None


def reloadable(chain: list[Stage]) -> bool:
    """Whether a stored row's media can be read again one row at a time."""
    return makers(chain) is not None


def read_again(made_by: list[Stage], rows: pa.Table) -> tuple[list, list[str | None]]:
    """The media of stored rows, made again by `made_by` (`makers`), and why a row could
    not be read again (None where it could, or where it has an error)."""
    source, *fan_out = made_by
    if fan_out:
        return fan_out[0].reload(rows, source)
    return source.reload(rows)


def chain_hash(rows_made_by: str, current: dict[str, str]) -> str:
    """One hash of what made the rows (`row_stages_hash`) and what each stamped stage
    stamps (`current`: model files and code markers included, which a config's hash does
    not see)."""
    body = [rows_made_by, current]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def redo_filter(chain: list[Stage], have: set[str], current: dict[str, str]) -> str | None:
    """Lance filter of the rows whose inputs must be read again whole because a stamped
    stage must compute them and the source cannot read a stored row again (None: no
    such stage, or the source reads rows again itself). `current`: `stamps(chain)`, made
    once per run (a stamp may hash model files)."""
    if reloadable(chain):
        return None
    first = shaping(chain)
    parts = [f"({needs_filter(chain, i, current[chain[i].name], have)})"
             for i in range(first, len(chain))]
    return " OR ".join(parts) or None


def _verdict_filter(stage: Stage, stamp: str) -> str:
    column = _quote(stage.stamp_column)
    return f"{column} LIKE '{_row_part(stamp)}/%' AND {column} != '{stamp}'"


@dataclass
class StageWork:
    """What a run did (or, planned, would do) for one stamped stage."""

    computed: int = 0
    verdicts: int = 0
    seconds: float = 0.0
    why: dict[str, int] = field(default_factory=dict)


def _counts(backend, parts: list) -> list[int]:
    """Rows in each of `parts`, counted where they are."""
    return backend.gather(map_parts(backend, parts, num_rows))


def _verdicts_part(table: pa.Table, stage: ScoreFilter, stamp: str) -> pa.Table:
    scores = {c: table[c].combine_chunks() for c in stage.verdict_reads()
              if c in table.column_names}
    return pa.table({ROWADDR: table[ROWADDR], stage.verdict_column: stage.verdicts(table, scores),
                     stage.stamp_column: pa.array([stamp] * table.num_rows, pa.string())})


def refresh_verdicts(backend, store, chain: list[Stage],
                     current: dict[str, str]) -> dict[str, StageWork]:
    """Verdicts decided again from the stored scores where only thresholds changed."""
    done: dict[str, StageWork] = {}
    have = set(store.schema().names)
    for stage in chain[shaping(chain):]:
        if not isinstance(stage, ScoreFilter) or stage.stamp_column not in have:
            continue
        started = time.perf_counter()
        stamp = current[stage.name]
        columns = [c for c in stage.verdict_reads() if c in have]
        parts = scan(backend, store, columns, _verdict_filter(stage, stamp), _verdicts_part,
                     (stage, stamp))
        count = sum(_counts(backend, parts))
        if not count:
            continue
        write_columns(backend, store, parts, pa.schema(
            [(stage.verdict_column, pa.string()), (stage.stamp_column, pa.string())]),
            keep=True)
        done[stage.name] = StageWork(verdicts=count, seconds=time.perf_counter() - started)
    return done


def _compute_part(table: pa.Table, made_by: list[Stage], stage: RowStage, stamp: str,
                  readers: list[str], fed_by: list[Stage]) -> pa.Table:
    """The stage's columns (and stamp) for the rows of `table`, in its batches; media read
    again by `made_by` (`makers`) where the stage needs them. On clips, a stage that
    works on images sees each sampled frame as a row and its columns come back one value
    per clip (curate.frames), as in a run; the earlier stages on frames whose per-frame
    columns it reads in a run (`fed_by`: `frame_feeders`) compute them again per frame
    first (only the clip's reduced value is stored), without writing them. The stamps of
    the `readers` of its columns are taken off these rows (they compute them again next),
    and a row whose media cannot be read again gets the source's error."""
    import pickle
    from concurrent.futures import ThreadPoolExecutor

    from curate import frames

    # `prepare` runs on the reading thread with a copy of its own (a tokenizer or an image
    # processor is not shared across threads), as in a run, where it runs in another pool
    preparer = pickle.loads(pickle.dumps(stage))
    stage.setup()
    source = made_by[0]
    model = isinstance(stage, ModelStage) and stage.own_pool
    on_frames = any(cuts_clips(s) for s in made_by) and not stage.takes_clips
    fed_by = [pickle.loads(pickle.dumps(s)) for s in fed_by]
    wants_media = stage.needs_pixels() or model or bool(fed_by)
    types = stage.writes()
    size = stage.resources.batch_size
    chunks = [table.slice(start, size) for start in range(0, table.num_rows, size)]

    def ready(rows: pa.Table) -> tuple[pa.Table, list | None, list, object]:
        """A batch as `process` takes it (its media, or its model inputs; on clips, one
        row per frame), why each row could not be read again (None: it could, or it never
        could), and the frames per row (None: rows are not split into frames)."""
        media, unread = read_again(made_by, rows) if wants_media else \
            (None, [None] * rows.num_rows)
        counts = None
        if on_frames and media is not None:
            counts = frames.frame_counts(media, rows.num_rows)
            rows, media = rows.take(pa.array(frames.owners(counts))), frames.frames_of(media)
            for feeder in fed_by:
                for name, values in _on(feeder, rows, media).items():
                    at = rows.column_names.index(name) if name in rows.column_names else -1
                    rows = rows.set_column(at, name, values) if at >= 0 else \
                        rows.append_column(name, values)
        if model:
            prepared = preparer.prepare(rows, media)
            return rows.append_column(stage.prepared_column, prepared), None, unread, counts
        return rows, media, unread, counts

    out = []
    # the next batch is read, decoded and prepared on a thread (PIL, libjpeg-turbo and
    # NumPy let go of the GIL) while the stage works on this one, as in a run's pools
    with ThreadPoolExecutor(1) as reader:
        # the feeders run on the reading thread only: set up there, first
        for setting_up in [reader.submit(feeder.setup) for feeder in fed_by]:
            setting_up.result()
        ahead = reader.submit(ready, chunks[0]) if chunks else None
        for k in range(len(chunks)):
            rows, media, unread, counts = ahead.result()
            if k + 1 < len(chunks):
                ahead = reader.submit(ready, chunks[k + 1])
            columns = stage.process(rows, media)
            if counts is not None:  # frames back to their clips
                rows = chunks[k]
                columns = frames.reduce(stage, rows, columns, counts)
            read = pa.array([why is None for why in unread])
            values = {c: pc.if_else(read, v.cast(types[c]), pa.scalar(None, types[c]))
                      for c, v in columns.items()}
            taken_off = {Stage.STAMP_PREFIX + r: pa.nulls(rows.num_rows, pa.string())
                         for r in readers}
            # a row that cannot be read any more says why, as it would in a fresh run
            error = source.verdict_column
            said = {error: pc.coalesce(rows[error], pa.array(unread, pa.string()))}
            computed = pa.table({ROWADDR: rows[ROWADDR], **values, **said})
            stamps = unstamped(stage, computed, pa.array([stamp] * rows.num_rows, pa.string()))
            out.append(pa.table({**{c: computed[c] for c in computed.column_names},
                                 stage.stamp_column: stamps, **taken_off}))
    return concat(out) if out else pa.table({})


def _on(stage: Stage, rows: pa.Table, media: list | None) -> dict[str, pa.Array]:
    """`stage.process` on rows and their media (a model stage prepares its inputs first)."""
    if isinstance(stage, ModelStage) and stage.own_pool:
        prepared = stage.prepare(rows, media)
        return stage.process(rows.append_column(stage.prepared_column, prepared), None)
    return stage.process(rows, media)


def recompute(backend, store, chain: list[Stage], current: dict[str, str],
              grow=None) -> dict[str, StageWork]:
    """Each stamped stage, in order, on the rows it must compute (the source reads their
    media again); one commit per stage. A row whose media cannot be read again gets the
    source's error, which drops it (a transient one makes the next run read its input
    again whole). `grow(rows)` gives the backend for a stage that computes that many
    rows (a run in one process moves to Ray for many)."""
    made_by = makers(chain)
    done: dict[str, StageWork] = {}
    if made_by is None:
        return done
    source = made_by[0]
    made = {n for s in made_by for n in s.written_names()}
    dependent = readers(chain)
    for index in range(shaping(chain), len(chain)):
        stage = chain[index]
        have = set(store.schema().names)
        started = time.perf_counter()
        fed_by = frame_feeders(chain, index)
        columns = sorted({*made, *stage.reads(), *(c for s in fed_by for c in s.reads())}
                         & have)
        parts = scan(backend, store, columns, needs_filter(chain, index, current[stage.name],
                                                           have))
        counts = _counts(backend, parts)
        count = sum(counts)
        if not count:
            continue
        grown = grow(count) if grow is not None else backend
        if grown is not backend:  # the parts read here go to the cluster
            backend = grown
            parts = [backend.put(part) for part in parts]
        # as many tasks as the stage's pool would have workers (each loads the model once);
        # a task also runs the feeders' models, so it holds what the largest of them asks
        res = stage.resources
        cpus = max(s.resources.cpus for s in (stage, *fed_by))
        gpus = max(s.resources.gpus for s in (stage, *fed_by))
        workers = res.concurrency or backend.slots(cpus, gpus)
        parts = blocks(backend, parts, counts, max(res.batch_size, -(-count // workers)))
        task = backend.task(_compute_part, num_cpus=cpus, **({"num_gpus": gpus} if gpus else {}))
        names = [r.name for r in dependent[stage.name]]
        computed = [task.remote(part, made_by, stage, current[stage.name], names, fed_by)
                    for part in parts]
        schema = pa.schema([*stage.writes().items(), (stage.stamp_column, pa.string()),
                            *((Stage.STAMP_PREFIX + r, pa.string()) for r in names),
                            (source.verdict_column, pa.string())])
        write_columns(backend, store, computed, schema, keep=True)
        done[stage.name] = StageWork(computed=count, seconds=time.perf_counter() - started)
    return done


def _plan_part(table: pa.Table, chain: list[Stage], current: dict[str, str]) -> list[dict]:
    """For one part of the table: per stamped stage, (rows to compute by why, verdicts to
    decide), the verdicts of moved thresholds applied before later stages are counted."""
    from curate.verdicts import alive_mask

    table = table.combine_chunks()
    out = []
    for index in range(shaping(chain), len(chain)):
        stage = chain[index]
        stamp = current[stage.name]
        column = stage.stamp_column
        have = column in table.column_names
        stamped = table[column].to_pylist() if have else [None] * table.num_rows
        verdicts = skip_verdicts(chain, index)
        alive = (alive_mask(table, verdicts).to_pylist() if verdicts is not None
                 else [True] * table.num_rows)
        row = _row_part(stamp)
        why: dict[str, int] = {}
        redecided = []
        for i, value in enumerate(stamped):
            if value is not None and value.startswith(row + "/"):
                if value != stamp:
                    redecided.append(i)
                continue
            if not alive[i]:
                continue
            reason = ("new stage" if not have else "skipped before, alive now" if value is None
                      else "changed params")
            why[reason] = why.get(reason, 0) + 1
        if (redecided and isinstance(stage, ScoreFilter)
                and stage.verdict_column in table.column_names):
            sub = table.take(pa.array(redecided))
            new = _verdicts_part(sub, stage, stamp)[stage.verdict_column].to_pylist()
            values = table[stage.verdict_column].to_pylist()
            for i, verdict in zip(redecided, new):
                values[i] = verdict
            index_of = table.column_names.index(stage.verdict_column)
            table = table.set_column(index_of, stage.verdict_column, pa.array(values, pa.string()))
        out.append({"stage": stage.name, "why": why, "verdicts": len(redecided)})
    return out


def plan(backend, store, chain: list[Stage], current: dict[str, str]) -> dict[str, StageWork]:
    """What `refresh_verdicts` and `recompute` would do, counted over fragments without
    writing (a stage whose params changed keeps its stored verdicts in the count of the
    stages after it: what it will decide is not known before it runs)."""
    have = set(store.schema().names)
    columns = {"sample_id"}
    for stage in chain[shaping(chain):]:
        columns.add(stage.stamp_column)
        if isinstance(stage, ScoreFilter):
            columns |= {*stage.verdict_reads(), stage.verdict_column}
    for index in range(len(chain)):
        columns |= set(skip_verdicts(chain, index) or [])
    parts = scan(backend, store, sorted(columns & have), None, _plan_part,
                 (chain, current))
    total: dict[str, StageWork] = {}
    for per_part in backend.gather(parts):
        for entry in per_part:
            work = total.setdefault(entry["stage"], StageWork())
            work.verdicts += entry["verdicts"]
            for reason, n in entry["why"].items():
                work.why[reason] = work.why.get(reason, 0) + n
                work.computed += n
    return total


def _current_part(table: pa.Table, rows: dict[str, str]) -> dict[str, int]:
    return {name: pc.sum(pc.starts_with(table[column], rows[name] + "/")).as_py() or 0
            for name, column in ((n, Stage.STAMP_PREFIX + n) for n in rows)
            if column in table.column_names}


def current_rows(backend, store, current: dict[str, str]) -> dict[str, int]:
    """Per stamped stage, the rows whose columns its current params made (counted in
    tasks over fragments)."""
    rows = {name: _row_part(stamp) for name, stamp in current.items()}
    have = set(store.schema().names)
    columns = [Stage.STAMP_PREFIX + n for n in rows if Stage.STAMP_PREFIX + n in have]
    if not columns:
        return {}
    total: dict[str, int] = {}
    for part in backend.gather(scan(backend, store, columns, None, _current_part, (rows,))):
        for name, n in part.items():
            total[name] = total.get(name, 0) + n
    return total
