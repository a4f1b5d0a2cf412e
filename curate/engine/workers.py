"""Row stages at work on a batch: the worker that runs one segment of the chain (the stages
that share a pool: curate.plan.segments): decode, stages, frames of clips, prepared model
inputs. The same workers run in Ray Data actor pools (curate.engine.ray_stream) and on
threads of this process (curate.engine.local_stream)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from functools import partial

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.plan import skip_verdicts
from curate.stage import FanOut, ModelStage, Source, Stage, count_input_rows, cuts_clips
from curate.table.fragments import TIMING_PREFIX, WORKER_PREFIX
from curate.verdicts import alive_mask

#: This process, as the run's pool records count workers (host and pid).
_WORKER = f"{socket.gethostname()}:{os.getpid()}"


def _peak_rss_kb() -> int:
    """The most memory this process has held so far (its peak resident set), in KiB."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def unstamped(stage: Stage, rows: pa.Table, stamps: pa.Array) -> pa.Array:
    """`stamps` with the rows the stage did not finish (`Stage.unfinished`) left null."""
    unfinished = stage.unfinished(rows)
    if unfinished is None:
        return stamps
    return pc.if_else(unfinished, pa.scalar(None, pa.string()), stamps)


def _add_timing(table: pa.Table, name: str, seconds: float) -> pa.Table:
    """Per-row seconds of `name`, added to what earlier pools measured for it."""
    column = TIMING_PREFIX + name
    values = pa.array([seconds / max(table.num_rows, 1)] * table.num_rows, pa.float64())
    if column in table.column_names:
        index = table.column_names.index(column)
        return table.set_column(index, column, pc.add(table[column], values))
    return table.append_column(column, values)


def _use_threads(threads: int) -> None:
    """Let a model on CPU use more threads than the CPUs Ray counted for its worker."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(threads)


class SegmentWorker:
    """A pool worker running one segment of the chain on each batch.

    In the first pool the source decodes each image once; the stages there see the pixels
    in memory, and the own-pool stages further on `prepare` their model inputs from them.
    Only columns (never images) travel to the next pool.
    """

    def __init__(self, stages: list[Stage], prepare: list[Stage], last: bool,
                 row_stages_hash: str, threads: int | None = None,
                 earlier_verdicts: dict[str, list[str]] | None = None, clips: bool = False,
                 frame_columns: tuple[str, ...] = (), inflight=None,
                 stamps: dict[str, str] | None = None, name_worker: bool = False):
        self.stages = stages
        #: Whether rows say which worker of the pool made them (a run on Ray counts them).
        self.name_worker = name_worker
        #: What each stamped stage writes on the rows it computes (curate.plan.stamps).
        self.stamps = stamps or {}
        #: The run's registry of batches in flight (curate.engine.inflight); None outside runs.
        self.inflight = inflight
        #: True where rows may be clips (in a pipeline that cuts videos, from the stage that
        #: cuts them on): image stages then see each sampled frame as a row.
        self.clips = clips
        maker = next((k for k, s in enumerate(stages) if cuts_clips(s)), None)
        on_frames = stages[maker + 1:] if maker is not None else (stages if clips else [])
        self._on_frame_rows = {id(s) for s in on_frames if not s.takes_clips}
        #: Prepared columns that hold one value per frame (lists, on clips).
        self.frame_columns = frame_columns
        self.prepare = prepare
        #: For stages that skip dropped rows: the verdict columns of the stages before them.
        self.earlier_verdicts = earlier_verdicts or {}
        self.last = last
        self.row_stages_hash = row_stages_hash
        if threads:
            _use_threads(threads)
        for stage in stages:
            stage.setup()

    def _on_alive(self, stage: Stage, batch: pa.Table, images, work,
                  empty: dict[str, pa.DataType]) -> dict[str, pa.Array]:
        verdicts = self.earlier_verdicts.get(stage.name)
        if verdicts is None:
            return work(batch, images)
        return _on_alive_rows(batch, images, verdicts, work, empty)

    def __call__(self, batch: pa.Table) -> pa.Table:
        key = self._starting(batch)
        tables = list(self._run(batch))
        self._done(key)
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def _starting(self, batch: pa.Table) -> str | None:
        """Tell the run's registry this batch is being worked on (see curate.engine.inflight)."""
        if self.inflight is None:
            return None
        from curate.engine.inflight import batch_inputs, batch_key

        names = [s.name for s in self.stages]
        key = batch_key(",".join(names), batch)
        self.inflight.start.remote(key, names, batch_inputs(batch))
        return key

    def _done(self, key: str | None) -> None:
        if key is not None:
            self.inflight.done.remote(key)

    def _run(self, batch: pa.Table) -> Iterator[pa.Table]:
        """The segment's output for `batch`: one table, or several when a fan-out stage
        hands its rows on in blocks (a video's clips, as they are cut)."""
        media = None
        out = batch
        rest = self.stages
        begun = time.time()  # wall clock: the run compares workers' spans across nodes
        if isinstance(self.stages[0], Source):
            source, *rest = self.stages
            started = time.perf_counter()
            out, media = source.load(batch)
            out = out.append_column("input_rows", count_input_rows(out["input_id"]))
            out = _add_timing(out, source.name, time.perf_counter() - started)
        if not self.name_worker:
            yield from self._after(out, media, rest)
            return
        # which worker of the pool made them, and when it worked on them (the run's pool
        # records count its workers and how many were at work at once: pools.WorkerSpans)
        worker = WORKER_PREFIX + self.stages[0].name
        for table in self._after(out, media, rest):
            tag = f"{_WORKER}@{begun:.3f}-{time.time():.3f}/{_peak_rss_kb()}"
            yield table.append_column(worker, pa.array([tag] * table.num_rows, pa.string())
                                      .dictionary_encode())

    def _after(self, out: pa.Table, media, stages: list[Stage]) -> Iterator[pa.Table]:
        for k, stage in enumerate(stages):
            if not isinstance(stage, FanOut):
                continue
            out = self._stages(out, media, stages[:k])
            started = time.perf_counter()
            # Blocks (they carry their own input_rows): each goes through the rest
            # of the segment as it comes, so one long input never sits whole in memory.
            # The earlier stages' seconds go with the first block, not once per new row.
            earlier = {c: pc.sum(out[c]).as_py() or 0.0 for c in out.column_names
                       if c.startswith(TIMING_PREFIX)}
            for rows, block_media in stage.expand(out, media):
                rows = rows.drop_columns([c for c in earlier if c in rows.column_names])
                for column, seconds in earlier.items():
                    rows = _add_timing(rows, column[len(TIMING_PREFIX):], seconds)
                earlier = dict.fromkeys(earlier, 0.0)
                rows = _add_timing(rows, stage.name, time.perf_counter() - started)
                yield from self._after(rows, block_media, stages[k + 1:])
                started = time.perf_counter()
            return
        yield self._finish(self._stages(out, media, stages), media)

    def _stages(self, out: pa.Table, media, stages: list[Stage]) -> pa.Table:
        """Row stages on `out`; on clips, runs of stages that work on frames see each frame
        as a row (curate.frames)."""
        i = 0
        while i < len(stages):
            stage = stages[i]
            if id(stage) in self._on_frame_rows:
                j = i
                while j < len(stages) and id(stages[j]) in self._on_frame_rows:
                    j += 1
                out = self._on_frames(out, media, stages[i:j])
                i = j
                continue
            out = self._on_rows(out, media, [stage])
            i += 1
        return out

    def _on_rows(self, out: pa.Table, media, stages: list[Stage]) -> pa.Table:
        for stage in stages:
            started = time.perf_counter()
            columns = self._on_alive(stage, out, media, stage.process, stage.writes())
            for name, values in columns.items():
                out = out.append_column(name, values)
            out = self._stamp(out, stage)
            out = _add_timing(out, stage.name, time.perf_counter() - started)
        return out

    def _on_frames(self, out: pa.Table, media, stages: list[Stage]) -> pa.Table:
        from curate import frames

        if media is not None:
            counts = frames.frame_counts(media, out.num_rows)
            rows = out.take(pa.array(frames.owners(counts)))
            images = frames.frames_of(media)
        else:
            listed = [c for c in self.frame_columns if c in out.column_names
                      and pa.types.is_list(out.schema.field(c).type)]
            if not listed:  # no frames travelled here: the stages work on the rows
                return self._on_rows(out, media, stages)
            rows, counts = frames.flatten_lists(out, listed)
            images = None
        for stage in stages:
            started = time.perf_counter()
            columns = self._on_alive(stage, rows, images, stage.process, stage.writes())
            for name, values in columns.items():
                rows = rows.append_column(name, values)
            reduced = frames.reduce(stage, out, columns, counts)
            for name in columns:
                out = out.append_column(name, reduced[name])
            out = self._stamp(out, stage)
            out = _add_timing(out, stage.name, time.perf_counter() - started)
        return out

    def _stamp(self, out: pa.Table, stage: Stage) -> pa.Table:
        """The stage's stamp on the rows it computed (null on those it skipped)."""
        stamp = self.stamps.get(stage.name)
        if stamp is None:
            return out
        values = pa.array([stamp] * out.num_rows, pa.string())
        verdicts = self.earlier_verdicts.get(stage.name)
        if verdicts is not None:
            values = pc.if_else(alive_mask(out, verdicts), values, pa.scalar(None, pa.string()))
        return out.append_column(stage.stamp_column, unstamped(stage, out, values))

    def _finish(self, out: pa.Table, media) -> pa.Table:
        for stage in self.prepare:
            if stage.prepared_column in out.column_names:
                continue  # a stage on the same model prepared the same inputs
            started = time.perf_counter()
            if self.clips and not stage.takes_clips:
                from curate import frames

                counts = frames.frame_counts(media, out.num_rows)
                rows = out.take(pa.array(frames.owners(counts)))
                columns = self._on_alive(stage, rows, frames.frames_of(media or []),
                                         partial(_prepared, stage),
                                         {stage.prepared_column: pa.null()})
                values = columns[stage.prepared_column]
                prepared = frames.as_lists(values, counts) if counts.sum() else \
                    pa.nulls(out.num_rows)
            else:
                columns = self._on_alive(stage, out, media, partial(_prepared, stage),
                                         {stage.prepared_column: pa.null()})
                prepared = columns[stage.prepared_column]
            out = out.append_column(stage.prepared_column, prepared)
            out = _add_timing(out, stage.name, time.perf_counter() - started)
        if self.last:
            out = out.drop_columns([c for c in out.column_names
                                    if c.startswith(Stage.PREPARED_PREFIX)])
            out = out.append_column(
                "row_stages_hash", pa.array([self.row_stages_hash] * out.num_rows))
        return out


class FanOutWorker(SegmentWorker):
    """A segment with a stage that turns one row into many: its output leaves in blocks of
    the batch size it was given, so the next pool gets even batches (a repartition
    operator would need a CPU the pools hold)."""

    def __call__(self, batch: pa.Table):
        # blocks of the batch size, or of what a streaming stage hands on together (a
        # video's clips come one video per batch)
        size = max(batch.num_rows, 1, *(s.block_rows
                                        for s in self.stages if isinstance(s, FanOut)))
        key = self._starting(batch)
        for out in self._run(batch):
            for start in range(0, max(out.num_rows, 1), size):
                yield out.slice(start, size)
        self._done(key)


def _prepared(stage: Stage, batch: pa.Table, images: list) -> dict[str, pa.Array]:
    return {stage.prepared_column: stage.prepare(batch, images)}


def _on_alive_rows(batch: pa.Table, images: list | None, verdicts: list[str], work,
                   empty: dict[str, pa.DataType]) -> dict[str, pa.Array]:
    """`work(batch, images)` on the rows no earlier stage dropped (the rest get nulls), so
    an expensive model is never run on a row that is already out."""
    # verdicts of global parts come after streaming: only row-stage verdicts are here
    alive = alive_mask(batch, verdicts).to_numpy(zero_copy_only=False)
    if alive.all():
        return work(batch, images)
    keep = np.flatnonzero(alive)
    sub_images = [images[i] for i in keep] if images is not None else None
    columns = work(batch.take(keep), sub_images) if len(keep) else {}
    where = np.full(batch.num_rows, -1)
    where[keep] = np.arange(len(keep))
    positions = pa.array(where, mask=~alive)
    if columns:
        return {name: values.take(positions) for name, values in columns.items()}
    return {name: pa.nulls(batch.num_rows, kind) for name, kind in empty.items()}


def worker_options(pools: list[list[Stage]], stages: list[Stage], row_stages_hash: str,
                   stamps: dict[str, str], inflight) -> list[dict]:
    """What each pool's `SegmentWorker` is built with, besides its stages and threads
    (`stamps`: curate.plan.stamps of `stages`, made once by the run)."""
    later = list({s.prepared_column: s for pool in pools[1:] for s in pool
                  if s.own_pool and isinstance(s, ModelStage)}.values())
    earlier = {s.name: verdicts for i, s in enumerate(stages)
               if (verdicts := skip_verdicts(stages, i)) is not None}
    clips = any(cuts_clips(s) for s in stages)
    frame_columns = tuple(s.prepared_column for s in later if not s.takes_clips)
    return [{"prepare": later if i == 0 else [], "last": i == len(pools) - 1,
             "row_stages_hash": row_stages_hash, "earlier_verdicts": earlier,
             "clips": (clips and i > 0) or any(cuts_clips(s) for s in pool),
             "frame_columns": frame_columns, "inflight": inflight, "stamps": stamps}
            for i, pool in enumerate(pools)]
