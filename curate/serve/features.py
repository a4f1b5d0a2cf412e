"""On-demand features computed by the pipeline's own stages.

A pipeline's row stages split into pools exactly as in a run
(`curate.plan.segments`): the source and the cheap stages decode and `prepare`
model inputs; each model stage (with the cheap stages that follow it) is one segment.
Here the decode part runs where the request arrives and each model segment is a Serve
deployment, so a feature computed on demand goes
through the same code, with the same model and weights, as the column in the table.

Computed features are kept by sample_id (`FeatureCache`, curate.table.features), and
nothing writes the samples table outside the run lease (curate.table.lease).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field

import pyarrow as pa
import yaml

from curate.config import Config, load_config, unredacted
from curate.engine.workers import SegmentWorker
from curate.errors import ConfigError
from curate.plan import build_stages, segments
from curate.stage import ModelStage, RowStage, Source, Stage
from curate.stages.image.ingest_images import sample_id_for
from curate.table.fragments import TIMING_PREFIX

log = logging.getLogger(__name__)

#: URI given to an uploaded image (its content hash names it).
UPLOAD_PREFIX = "upload:sha256:"
#: How often values kept while a run held the lease try to reach the table again.
RETRY_S = 30.0


def pipeline_config(pipeline: str | None, last_run_yaml: str | None,
                    media_options: dict[str, str] | None = None) -> Config | None:
    """The pipeline whose stages compute features: a file, else the latest run's config
    (whose redacted storage options become `media_options`)."""
    if pipeline:
        return load_config(pipeline)
    if not last_run_yaml:
        return None
    try:
        return load_config(unredacted(yaml.safe_load(last_run_yaml), media_options or {}))
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
        chain = [stages[0], *(s for s in stages[1:] if isinstance(s, RowStage))]
        pools = segments(chain)
        columns: dict[str, int] = {}
        for index, pool in enumerate(pools):
            for stage in pool:
                if isinstance(stage, Source):
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
                        if s.own_pool and isinstance(s, ModelStage)}.values())
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


