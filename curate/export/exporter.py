"""Export a selection of the table for training: WebDataset tar shards or Parquet.

The driver plans (`curate.export.sharding`) and commits nothing but the file names and an
`index.json`; tasks of the backend (curate.engine.backend: Ray, or threads here for a small
table) read the metadata, read each sample's media (checked against the hash taken at
ingest) and write the files. The export is recorded in `<table>_runs`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any, Literal

import numpy as np
import pyarrow as pa
import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

from curate.config import StoreConfig
from curate.engine.backend import InlineBackend, choose
from curate.errors import ConfigError, CurateError, storage_message
from curate.export.buckets import parse_buckets
from curate.export.outputs import Output
from curate.export.sharding import BINS, Order, WriterTask, histogram, plan, split
from curate.export.writers import (
    MediaOptions,
    Written,
    with_buckets,
    write_parquet,
    write_webdataset,
)
from curate.filters import FilterError, combine
from curate.media.decode import MediaError
from curate.media.objstore import checked, normalized
from curate.stage import Stage
from curate.table.layout import now

__all__ = ["ExportError", "ExportOptions", "ExportSummary", "export"]

#: Samples per shard (WebDataset) or part (Parquet) when not given.
DEFAULT_SHARD_SIZE = {"webdataset": 1000, "parquet": 50_000}
#: Columns a row needs to be exported, whatever metadata goes along.
MEDIA_COLUMNS = ("sample_id", "uri", "media_type", "format", "content_hash", "num_bytes",
                 "error", "source_hash", "clip_start_s", "clip_end_s", "fps", "width",
                 "height", "caption", "alt_text")
#: Bookkeeping columns left out of the default metadata.
INTERNAL = ("row_stages_hash", "input_rows", "content_hash", "source_hash", "error")
#: The shard list and counts. Beside Parquet parts it starts with `_`, so that readers of
#: the directory as one dataset (pyarrow, Spark, Hugging Face datasets) pass over it.
INDEX = {"webdataset": "index.json", "parquet": "_index.json"}


class ExportError(CurateError):
    """An export that cannot be done as asked."""


class ExportOptions(BaseModel):
    """What to export, and how. The same fields as `curate export`'s flags."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["webdataset", "parquet"] = "webdataset"
    out: str = Field(description="directory, or object-store prefix (s3://bucket/prefix), "
                     "to write into")
    where: str | None = Field(None, description="filter (the API's language)")
    all: bool = Field(False, description="every row, not only selected ones")
    limit: int | None = Field(None, ge=1, description="at most this many samples")
    seed: int | None = Field(None, description="shuffle deterministically with this seed")
    columns: list[str] | None = Field(None, description="metadata columns (default: scalars)")
    shard_size: int | None = Field(None, ge=1, description="samples per shard or part")
    shard_bytes: int | None = Field(None, ge=1024, description="bytes per shard, about")
    prefix: str = Field("shard", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
    image_format: Literal["jpg", "png", "webp"] | None = None
    max_side: int | None = Field(None, ge=16)
    quality: int = Field(95, ge=1, le=100)
    buckets: str | None = Field(None, description="sdxl or WxH,WxH,...")
    group_by_bucket: bool = False
    media: Literal["bytes", "uri"] = "bytes"
    version: int | str | None = Field(None, description="table version or tag to export")
    executor: Literal["auto", "ray", "local"] = Field(
        "auto", description="ray: tasks on a Ray cluster; local: threads in this process; "
        "auto: local for a small table when no cluster is given, else ray")
    overwrite: bool = False
    storage_options: Annotated[dict[str, str], AfterValidator(checked)] = Field(
        default_factory=dict, description="how to reach an object-store --out (the keys a "
        "source's storage_options take); empty: the store's media_storage_options, else "
        "the environment's credentials")

    @field_validator("buckets")
    @classmethod
    def _buckets(cls, value: str | None) -> str | None:
        if value is not None:
            parse_buckets(value)  # ValueError -> a validation error naming the key
        return value

    def bucket_list(self) -> tuple[str, ...]:
        return parse_buckets(self.buckets) if self.buckets else ()

    def size(self) -> int:
        return self.shard_size or DEFAULT_SHARD_SIZE[self.format]


def parse_options(raw: dict[str, Any]) -> ExportOptions:
    """ExportOptions, or ConfigError naming each bad key."""
    try:
        options = ExportOptions(**raw)
    except ValidationError as exc:
        raise ConfigError([(".".join(str(p) for p in e["loc"]), e["msg"])
                           for e in exc.errors()], "export options") from None
    problems = []
    if options.group_by_bucket and not options.buckets:
        problems.append(("group_by_bucket", "needs buckets (e.g. --buckets sdxl)"))
    if options.format == "parquet" and options.shard_bytes:
        problems.append(("shard_bytes", "applies to webdataset; parquet parts are cut by "
                                        "shard_size"))
    if options.format == "webdataset" and options.media == "uri":
        problems.append(("media", "uri applies to parquet; a shard always holds the media"))
    if problems:
        raise ConfigError(problems, "export options")
    return options


@dataclass
class ExportSummary:
    format: str
    out: str
    table: str
    store_uri: str
    version: int
    filter: str | None
    selected: int
    written: int
    files: list[dict[str, Any]] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    run_id: str = ""
    #: rows of the selection that a person gave a verdict on (curate.reviews)
    reviewed: int = 0

    @property
    def index(self) -> str:
        return Output(self.out).path(INDEX[self.format])

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --- the parts that run in tasks -------------------------------------------------------


def _split_task(part: pa.Table, order: Order, tasks: list[WriterTask]):
    pieces = split(part, order, tasks)
    return pieces if len(pieces) > 1 else pieces[0]


def _write_task(options: ExportOptions, task: WriterTask, columns: list[str], out: Output,
                reach: tuple[tuple[str, str], ...], *pieces: pa.Table) -> Written:
    from curate.parts import concat

    rows = with_buckets(concat(pieces), options.bucket_list())
    media = MediaOptions(options.image_format, options.max_side, options.quality, reach)
    if options.format == "webdataset":
        return write_webdataset(rows, task, out, columns, media, options.size(),
                                options.shard_bytes)
    return write_parquet(rows, task, out, columns, media, options.media == "bytes",
                         options.size())


# --- where the tasks run --------------------------------------------------------------

#: The largest object S3 copies in one request: a shard is renamed by a copy.
MAX_COPY = 5 * 1024**3

#: Rows of a table that `executor: auto` exports in this process when no cluster is given:
#: below this, starting a local Ray costs more than the parallel writers save.
LOCAL_ROWS = 20_000


class _TaskWriters:
    """Scan, split and write as tasks of the backend (on Ray: rows move between workers,
    never through the driver)."""

    def __init__(self, backend, store, dataset):
        self.backend, self.store, self.dataset = backend, store, dataset

    def histogram(self, read: list[str], where: str | None, order: Order) -> np.ndarray:
        from curate.engine.tasks import map_parts, scan

        self.parts = scan(self.backend, self.store, read, where, dataset=self.dataset)
        return sum(self.backend.gather(map_parts(self.backend, self.parts, histogram,
                                                 (order,))),
                   np.zeros((order.groups, BINS), np.int64))

    def write(self, tasks, options, columns, out, order, reach):
        if not tasks:
            return
        splitter = self.backend.task(_split_task)
        pieces = [splitter.options(num_returns=len(tasks)).remote(p, order, tasks)
                  for p in self.parts]
        if len(tasks) == 1:
            pieces = [[p] for p in pieces]
        writer = self.backend.task(_write_task, max_retries=2)
        refs = [writer.remote(options, task, columns, out, reach, *[p[i] for p in pieces])
                for i, task in enumerate(tasks)]
        yield from self.backend.as_completed(refs)


class _ThreadWriters:
    """Inline: the same plan and writers on threads of this process (reading files, hashing
    and writing tar members let go of the GIL), for a table too small to be worth a
    cluster."""

    def __init__(self, backend, dataset):
        self.dataset = dataset
        self.threads = backend.num_cpus

    def histogram(self, read: list[str], where: str | None, order: Order) -> np.ndarray:
        self.rows = self.dataset.to_table(columns=read, filter=where)
        return histogram(self.rows, order)

    def write(self, tasks, options, columns, out, order, reach):
        from concurrent.futures import ThreadPoolExecutor, as_completed

        if not tasks:
            return
        pieces = split(self.rows, order, tasks)
        with ThreadPoolExecutor(max_workers=self.threads) as pool:
            futures = {pool.submit(_write_task, options, task, columns, out, reach,
                                   pieces[i]): i
                       for i, task in enumerate(tasks)}
            for future in as_completed(futures):
                yield futures[future], future.result()


# --- the driver ----------------------------------------------------------------------------


def _open(store, version: int | str | None):
    """The samples table's Lance dataset at `version` (default: the latest)."""
    import lance

    latest = store.dataset()
    if latest is None:
        raise ExportError(f"no table {store.name} at {store.uri}; run `curate run` first "
                          "or pass the right --store/--table")
    if version is None:
        return latest
    try:
        return lance.dataset(store.uri_of_table, version=version,
                             storage_options=store.storage_options)
    except (ValueError, OSError) as exc:
        raise ExportError(f"table {store.name} has no version {version!r} (latest: "
                          f"{latest.version}): {storage_message(exc)}") from None


def _columns(options: ExportOptions, schema: pa.Schema, buckets: bool) -> list[str]:
    if options.columns:
        unknown = [c for c in options.columns if c not in schema.names]
        if unknown:
            raise ExportError(f"unknown columns {', '.join(unknown)}; columns: "
                              + ", ".join(schema.names))
        chosen = list(options.columns)
    else:
        chosen = [f.name for f in schema if f.name not in INTERNAL
                  and not f.name.startswith(("_", Stage.STAMP_PREFIX))
                  and (pa.types.is_primitive(f.type) or pa.types.is_string(f.type)
                       or pa.types.is_large_string(f.type) or pa.types.is_timestamp(f.type))]
    return [*chosen, "bucket"] if buckets and "bucket" not in chosen else chosen


def _ours(name: str, prefix: str) -> bool:
    """Files an earlier export wrote into a directory."""
    return name in INDEX.values() or (name.startswith((f"{prefix}-", "part-", ".task"))
                             and name.endswith((".tar", ".parquet", ".part")))


def _prepare_out(out: Output, prefix: str, overwrite: bool) -> None:
    try:
        earlier = [n for n in out.prepare() if _ours(n, prefix)]
    except (MediaError, OSError) as exc:
        raise ExportError(f"cannot write into {out.root}: {exc}") from None
    if earlier and not overwrite:
        raise ExportError(f"{out.root} already holds an export ({', '.join(earlier[:3])}"
                          f"{' ...' if len(earlier) > 3 else ''}); pass --overwrite to "
                          "replace it, or choose another --out")
    # the index first: a reader never finds one naming files that are gone
    for name in sorted(earlier, key=lambda n: (n not in INDEX.values(), n)):
        try:
            out.remove(name)
        except (MediaError, OSError) as exc:
            raise ExportError(f"cannot remove {out.path(name)} of the earlier export: "
                              f"{exc}") from None


def _final_names(results: list[Written], tasks: list[WriterTask], options: ExportOptions,
                 buckets: tuple[str, ...], out: Output) -> list[dict[str, Any]]:
    """The files in order, renamed from their task-local names to consecutive ones."""
    files, numbers = [], Counter()
    for task, written in zip(tasks, results):
        bucket = None
        if options.group_by_bucket:
            bucket = buckets[task.group] if task.group < len(buckets) else "unknown"
        for item in written.files:
            n = numbers[bucket]
            numbers[bucket] += 1
            if options.format == "webdataset":
                middle = f"-{bucket}" if bucket else ""
                name = f"{options.prefix}{middle}-{n:06d}.tar"
            else:
                name = f"part-{n:05d}.parquet"
            try:
                out.rename(item["name"], name)
            except (MediaError, OSError) as exc:
                raise ExportError(f"cannot name {out.path(name)}: {exc}") from None
            entry = {"name": name, "samples": item["samples"], "bytes": item["bytes"]}
            if bucket:
                entry["bucket"] = bucket
            files.append(entry)
    return files


def export(store_config: StoreConfig, options: ExportOptions | dict[str, Any],
           progress: bool = False, address: str | None = None) -> ExportSummary:
    """Write the selection as WebDataset shards or Parquet parts under `options.out`."""
    from curate.logs import progress_bar

    if isinstance(options, dict):
        options = parse_options(options)
    started, clock = now(), time.perf_counter()
    from curate.table.store import Store

    store = Store(store_config)
    dataset = _open(store, options.version)
    names = dataset.schema.names
    if not options.all and "selected" not in names:
        raise ExportError(f"table {store.name} has no `selected` column yet (no finished "
                          "run); pass --all to export every row")
    try:
        where = combine(options.where, None if options.all else True, names)
    except FilterError as exc:
        raise ExportError(str(exc)) from None
    buckets = options.bucket_list()
    columns = _columns(options, dataset.schema, bool(buckets))
    out = Output.of(options.out, options.storage_options
                    or store_config.media_storage_options)
    options = options.model_copy(update={"out": out.root})
    if out.root.startswith(("s3://", "s3a://")) and (options.shard_bytes or 0) > MAX_COPY:
        raise ExportError(f"shard_bytes {options.shard_bytes:,} is over the {MAX_COPY:,} "
                          "bytes an S3 object can be copied (renamed) in one request")
    _prepare_out(out, options.prefix, options.overwrite)
    order = Order(options.seed, buckets, options.group_by_bucket)
    read = [c for c in dict.fromkeys([*MEDIA_COLUMNS, *columns]) if c in names]
    # as a run would start (curate.engine.backend), then by the table's size
    backend = choose(options.executor, address,
                     large=dataset.count_rows() > LOCAL_ROWS)  # the manifest's count
    writers = (_ThreadWriters(backend, dataset) if isinstance(backend, InlineBackend)
               else _TaskWriters(backend, store, dataset))
    try:
        counts = writers.histogram(read, where, order)
    except Exception as exc:  # Lance's verdict on a filter it cannot run
        raise ExportError(f"cannot read the selection ({where}): "
                          f"{str(exc).splitlines()[0][:300]}") from None
    tasks = plan(counts, options.limit, options.size())
    selected = sum(t.stop - t.start for t in tasks)
    results: dict[int, Written] = {}
    with progress_bar(progress) as bar:
        bar_task = bar.add_task(f"export {options.format}", total=selected, rate="")
        reach = normalized(store_config.media_storage_options)
        for index, written in writers.write(tasks, options, columns, out, order, reach):
            results[index] = written
            bar.advance(bar_task, tasks[index].stop - tasks[index].start)
    ordered = [results[i] for i in range(len(tasks))]
    files = _final_names(ordered, tasks, options, buckets, out)
    skipped: Counter = Counter()
    examples: dict[str, str] = {}
    for written in ordered:
        skipped.update(written.skipped)
        for k, v in written.examples.items():
            examples.setdefault(k, v)
    summary = ExportSummary(
        format=options.format, out=out.root, table=store.name, store_uri=store.uri,
        version=int(dataset.version), filter=where, selected=selected,
        written=sum(f["samples"] for f in files), files=files, skipped=dict(skipped),
        skipped_examples=examples, seconds=time.perf_counter() - clock,
        run_id=f"export-{uuid.uuid4().hex[:12]}",
        reviewed=dataset.count_rows(filter=" AND ".join(
            [*([f"({where})"] if where else []), "review IS NOT NULL"]))
        if "review" in names else 0)
    _write_index(summary, options, columns, out)
    _record(store, summary, options, started)
    return summary


def _write_index(summary: ExportSummary, options: ExportOptions, columns: list[str],
                 out: Output) -> None:
    """The index, written last: a reader that finds it finds every file it names."""
    index = {
        "format": summary.format, "table": summary.table, "store": summary.store_uri,
        "version": summary.version, "filter": summary.filter, "seed": options.seed,
        "limit": options.limit, "shard_size": options.size(),
        "shard_bytes": options.shard_bytes, "buckets": list(options.bucket_list()),
        "group_by_bucket": options.group_by_bucket, "columns": columns,
        "media": options.media, "image_format": options.image_format,
        "max_side": options.max_side, "samples": summary.written,
        "selected": summary.selected, "reviewed": summary.reviewed,
        "skipped": summary.skipped,
        "shards" if summary.format == "webdataset" else "parts": summary.files,
        "run_id": summary.run_id,
    }
    try:
        out.write_text(INDEX[summary.format], json.dumps(index, indent=2))
    except (MediaError, OSError) as exc:
        raise ExportError(f"the files are written, but not the index "
                          f"{out.path(INDEX[summary.format])}: {exc}") from None


def _record(store, summary: ExportSummary, options: ExportOptions, started) -> None:
    """The export in `<table>_runs` (kind `export`): what, where, from which version."""
    record = {
        "run_id": summary.run_id, "kind": "export", "pipeline": f"export:{summary.format}",
        "status": "finished", "config_yaml": yaml.safe_dump(options.model_dump(
                   mode="json", exclude={"storage_options"}), sort_keys=False),
        "started_at": started, "finished_at": now(), "seconds": summary.seconds,
        "version_before": summary.version, "version_after": summary.version,
        "rows_total": summary.selected, "rows_processed": summary.written,
        "stages_json": {"out": summary.out, "filter": summary.filter,
                        "files": len(summary.files), "skipped": summary.skipped},
    }
    try:
        store.save_run(record)
    except CurateError:
        raise
    except Exception as exc:  # a store this user may read but not write
        raise ExportError(f"the export is written to {summary.out}, but it could not be "
                          f"recorded in {store.name}_runs: {storage_message(exc)}") from None
