"""On-demand features computed by the pipeline's own stages.

A pipeline's row stages split into pools exactly as in a run (`runner.segments`): the
source and the cheap stages decode and `prepare` model inputs; each model stage (with the
cheap stages that follow it) is one segment. Here the decode part runs where the request
arrives and each model segment is a Serve deployment, so a feature computed on demand goes
through the same code, with the same model and weights, as the column in the table.

Computed features are kept by sample_id (`FeatureCache`), and nothing writes the samples
table outside the run lease (curate.table.lease).
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from dataclasses import dataclass, field

import pyarrow as pa
import yaml

from curate.config import Config, load_config
from curate.engine.ray_stream import TIMING_PREFIX, SegmentWorker, segments
from curate.errors import ConfigError
from curate.pipeline import build_stages
from curate.stage import Stage
from curate.stages.ingest import sample_id_for
from curate.table.lease import CACHE_RUN, RunLease
from curate.table.store import NULL_VECTORS

log = logging.getLogger(__name__)

#: URI given to an uploaded image (its content hash names it).
UPLOAD_PREFIX = "upload:sha256:"
#: Column of `<table>_features` marking values of rows of the table not yet merged there.
FOR_TABLE = "for_table"
#: How often values kept while a run held the lease try to reach the table again.
RETRY_S = 30.0
#: Kept values merged into the table per step, all steps under one hold of the lease: the
#: feature service holds one step's rows at a time, never the whole side table.
MERGE_BATCH = 1000


def pipeline_config(pipeline: str | None, last_run_yaml: str | None) -> Config | None:
    """The pipeline whose stages compute features: a file, else the latest run's config."""
    if pipeline:
        return load_config(pipeline)
    if not last_run_yaml:
        return None
    try:
        return load_config(yaml.safe_load(last_run_yaml))
    except ConfigError as exc:
        raise ConfigError(exc.problems, "the config recorded by the latest run") from None


@dataclass
class FeaturePlan:
    """Which stage computes which feature column, split as a run splits it into pools."""

    decode: list[Stage]  # the source and the stages of the decoding pool
    prepare: list[Stage]  # model stages whose inputs are prepared while decoding
    segments: list[list[Stage]]  # one per model deployment
    columns: dict[str, int] = field(default_factory=dict)  # feature -> segment (-1: decode)
    types: dict[str, pa.DataType] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: Config, wanted: list[str] | None = None,
                    also: list[str] = ()) -> FeaturePlan:
        """`wanted`: the features offered (None: all); `also`: columns kept when the
        pipeline computes them (the vector column that text search needs)."""
        stages = build_stages(config)
        chain = [stages[0], *(s for s in stages[1:] if s.has_row_part)]
        pools = segments(chain)
        columns: dict[str, int] = {}
        for index, pool in enumerate(pools):
            for stage in pool:
                if stage.is_source:
                    continue
                for name in stage.written_names():
                    if name != stage.verdict_column:
                        columns[name] = index - 1
        if wanted is not None:
            unknown = [w for w in wanted if w not in columns]
            if unknown:
                raise ConfigError([("features", f"{', '.join(unknown)} not computed by any "
                                    f"row stage of {config.name}; it computes: "
                                    + ", ".join(columns))])
            columns = {name: columns[name] for name in [*wanted, *also] if name in columns}
        needed = max(columns.values(), default=-1) + 1  # later segments need earlier ones
        model_pools = pools[1:needed + 1]
        prepare = list({s.prepared_column: s for pool in model_pools for s in pool
                        if s.own_pool and s.has_prepare_part}.values())
        types = {}
        for pool in pools[:needed + 1]:
            for stage in pool:
                if any(name in columns for name in stage.written_names()):
                    types.update({k: v for k, v in stage.writes().items() if k in columns})
        return cls(pools[0], prepare, model_pools, columns, types)

    def needs(self, features: list[str]) -> int:
        """How many model segments computing `features` takes."""
        return max((self.columns[f] for f in features), default=-1) + 1


def listing(sample_id: str, uri: str, text: str | None, offset: int = -1,
            size: int = -1) -> pa.Table:
    """One row shaped like the source's listing of inputs (see IngestImages.list_entry)."""
    return pa.table({
        "input_id": pa.array([sample_id], pa.string()),
        "uri": pa.array([uri], pa.string()),
        "alt_text": pa.array([text], pa.string()),
        "_offset": pa.array([offset], pa.int64()),
        "_size": pa.array([size], pa.int64()),
        "_error": pa.array([None], pa.string()),
        "_order": pa.array([0], pa.int64()),
    })


def upload_id(digest: str) -> tuple[str, str]:
    uri = UPLOAD_PREFIX + digest
    return sample_id_for(uri), uri


class Decoder:
    """The decoding pool of a run, for one request at a time."""

    def __init__(self, plan: FeaturePlan):
        self.worker = SegmentWorker(plan.decode, plan.prepare, last=False, row_stages_hash="")

    def __call__(self, rows: pa.Table, data: bytes | None = None) -> pa.Table:
        """Read (or, for an upload, take `data`), decode and prepare `rows`."""
        if data is None:
            return self.worker(rows)
        with tempfile.NamedTemporaryFile(prefix="curate-upload-") as fh:
            fh.write(data)
            fh.flush()
            uri = rows["uri"]
            out = self.worker(rows.set_column(1, "uri", pa.array([fh.name] * rows.num_rows)))
        return out.set_column(out.column_names.index("uri"), "uri", uri)


def run_segment(worker: SegmentWorker, tables: list[pa.Table]) -> list[pa.Table]:
    """One model call over the rows of several requests; each gets its rows back."""
    merged = pa.concat_tables(tables, promote_options="permissive")
    out = worker(merged)
    out = out.drop_columns([c for c in out.column_names if c.startswith(TIMING_PREFIX)])
    parts, start = [], 0
    for table in tables:
        parts.append(out.slice(start, table.num_rows))
        start += table.num_rows
    return parts


def sized(stages: list[Stage], batch_size: int) -> list[Stage]:
    """The stages with `batch_size` rows per model call (hosting batches are small)."""
    out = []
    for stage in stages:
        resources = stage.params.resources.model_copy(update={"batch_size": batch_size})
        out.append(type(stage)(stage.params.model_copy(update={"resources": resources})))
    return out


def text_embedder(stages: list[Stage], column: str):
    """The stage in `stages` that writes the image vectors of `column` (for text search)."""
    for stage in stages:
        if column in stage.written_names() and hasattr(stage, "embedder"):
            return stage.embedder
    return None


def _in(ids: list[str]) -> str:
    quoted = ", ".join("'" + i.replace("'", "''") + "'" for i in ids)
    return f"sample_id IN ({quoted})"


class FeatureCache:
    """Features computed on demand, kept by sample_id.

    Values of images outside the table (uploads, URLs) go to `<table>_features`, which no
    run writes. A value of a row of the table goes into that row, but only under the run
    lease, held for that one merge and taken only when no one holds it: a write beside a
    run's commits could make them conflict (failing a run that may have worked for hours)
    or be lost under the run's rewrite of the row. While a run holds the lease, the request
    neither waits for it nor fails: the value is answered, kept in `<table>_features` with
    `for_table` set (served from there meanwhile) and merged into the row under the lease
    once the run has ended: by the next value cached, or by `flush`, which the feature
    service calls every `RETRY_S`. A value the run has since set in the row wins; a row the
    run removed takes none.
    """

    def __init__(self, store, types: dict[str, pa.DataType]):
        self.store = store
        self.types = types
        self.side_name = f"{store.name}_features"

    def side(self):
        return self.store.open_table(self.side_name)

    def side_values(self, sample_id: str, wanted: list[str]) -> dict:
        """The values kept in `<table>_features` for `sample_id` (of `wanted`, not null)."""
        side = self.side()
        if side is None:
            return {}
        present = [c for c in wanted if c in side.schema.names]
        rows = side.to_lance().to_table(columns=present, filter=_in([sample_id]))
        return {k: v for k, v in rows.to_pylist()[0].items() if v is not None} \
            if rows.num_rows else {}

    def put(self, row: pa.Table, uri: str, known: bool) -> str:
        """Keep one row of computed values (sample_id and feature columns). Returns where
        they went: "table", "pending" (kept beside it while a run holds the lease) or
        "side_table" (an image outside the table)."""
        if known and self._merge(row):
            return "table"
        flag = pa.array([known], pa.bool_())
        self._side_put(row.append_column("uri", pa.array([uri], pa.string()))
                       .append_column(FOR_TABLE, flag))
        return "pending" if known else "side_table"

    def pending(self, limit: int | None = None) -> pa.Table | None:
        """Up to `limit` (default MERGE_BATCH) values of rows of the table waiting for the
        lease (None: none)."""
        side = self.side()
        if side is None or FOR_TABLE not in side.schema.names:
            return None
        rows = side.to_lance().to_table(filter=f"{FOR_TABLE} = true",
                                        limit=limit or MERGE_BATCH)
        return rows.drop_columns(["uri", FOR_TABLE]) if rows.num_rows else None

    def flush(self) -> bool:
        """Merge the pending values into the table under the lease; False while someone
        holds it (they stay pending)."""
        return self.pending(limit=1) is None or self._merge(None)

    # --- writes ---------------------------------------------------------------------------
    def _side_put(self, row: pa.Table) -> None:
        side = self.side()
        if side is None:
            self.store.db.create_table(self.side_name, row, on_bad_vectors=NULL_VECTORS)
            return
        missing = [f for f in row.schema if f.name not in side.schema.names]
        if missing:
            side.add_columns(pa.schema(missing))
        (side.merge_insert("sample_id").when_matched_update_all()
         .when_not_matched_insert_all().execute(row, on_bad_vectors=NULL_VECTORS))

    def _merge(self, row: pa.Table | None) -> bool:
        """Under a short hold of the run lease, merge `row` and the pending values into
        the table and drop those from `<table>_features`; False when the lease is held."""
        lease = RunLease(self.store, CACHE_RUN + secrets.token_hex(4))
        if not lease.try_acquire():
            return False
        try:
            while True:  # a step of at most MERGE_BATCH kept values (and `row`) at a time
                pending = self.pending()
                parts = [t for t in (pending, row) if t is not None]
                if not parts:
                    break
                if not lease.held():  # taken over since (a hold that lasted too long)
                    return False
                self._into_table(pa.concat_tables(parts, promote_options="permissive"))
                row = None
                if pending is None:
                    break
                self.side().delete(f"{FOR_TABLE} = true AND "
                                   + _in(pending["sample_id"].to_pylist()))
                log.info("features of %d rows, kept while a run held the lease, are in "
                         "table %s now", pending.num_rows, self.store.name)
                if pending.num_rows < MERGE_BATCH:
                    break
        finally:
            lease.release()
        return True

    def _into_table(self, rows: pa.Table) -> None:
        """Set the values of `rows` on the table's rows that have none (later rows of one
        sample_id win over earlier ones)."""
        values: dict[str, dict] = {}
        for row in rows.to_pylist():
            sample_id = row.pop("sample_id")
            values.setdefault(sample_id, {}).update(
                {k: v for k, v in row.items() if v is not None})
        columns = sorted({c for v in values.values() for c in v})
        if not columns:
            return
        dataset = self.store.dataset()
        have = [c for c in columns if c in dataset.schema.names]
        merged = {}
        for current in dataset.to_table(columns=["sample_id", *have],
                                        filter=_in(list(values))).to_pylist():
            new = values[current["sample_id"]]
            merged[current["sample_id"]] = {
                "sample_id": current["sample_id"],
                **{c: current[c] if current.get(c) is not None else new.get(c)
                   for c in columns}}
        if not merged:  # the rows are gone (a run removed them): nothing to fill
            return
        schema = pa.schema([("sample_id", pa.string())]
                           + [(c, self.types.get(c, rows.schema.field(c).type))
                              for c in columns])
        self.store.ensure_table(schema)
        (self.store.table().merge_insert("sample_id").when_matched_update_all()
         .execute(pa.Table.from_pylist(list(merged.values()), schema=schema),
                  on_bad_vectors=NULL_VECTORS))
