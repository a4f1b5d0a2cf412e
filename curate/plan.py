"""The pure plan of a run, from its config: the stages built (local paths made absolute),
checked to fit together, the table's schema, and the fingerprint of the row stages. No
engine, no table, no config import: `curate.config` checks configs with it."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyarrow as pa

from curate.errors import ConfigError
from curate.registry import get_stage_class
from curate.reviews import REVIEW_COLUMNS, REVIEW_STAGE
from curate.stage import FanOut, GlobalStage, ModelStage, RowStage, Source, Stage, cuts_clips

#: Columns the pipeline itself writes, derived from the stages' verdicts.
FINAL_COLUMNS: dict[str, pa.DataType] = {
    "selected": pa.bool_(),
    "reject_reason": pa.string(),
    "duplicate_of": pa.string(),
    "row_stages_hash": pa.string(),
    "input_rows": pa.int32(),
}


def build_stages(config) -> list[Stage]:
    """The stages of `config` (a curate.config.Config), with the local paths they name
    made absolute here (see `resolve_local_paths`); `config` itself (its YAML, its hash)
    is left as written."""
    stages = [resolve_local_paths(get_stage_class(p.type)(p)) for p in config.stages]
    for i, stage in enumerate(stages):
        stage.plan(stages[i + 1:])
    return stages


def row_chain(stages: list[Stage]) -> list[Stage]:
    """The source and the row stages after it: what the row stream runs, in its pools
    (`segments`)."""
    return [stages[0], *(s for s in stages[1:] if isinstance(s, RowStage))]


def local_path(value: str, base: str | None = None) -> str:
    """`value` made absolute against `base` (default: the working directory) when it names
    a file or directory that exists here, or is a glob; else as written: a URL, a hub id
    (org/name), or a missing path that the run reports as it is."""
    if "://" in value:
        return value
    path = os.path.expanduser(value)
    if os.path.isabs(path):
        return path
    full = os.path.join(base or os.getcwd(), path)
    if os.path.exists(full) or any(c in path for c in "*?["):
        return os.path.abspath(full)
    return value


def resolve_local_paths(stage: Stage, base: str | None = None) -> Stage:
    """Make the local paths in `stage.local_path_params` absolute, as this process (the
    driver) sees them. Stages travel to workers on other nodes, whose working directory
    is another one: a relative `examples/models/tiny-clip` must not be looked up there.
    The params are replaced by a copy, never changed in place: they belong to the config
    (`configured_params` keeps them, and with them the fingerprints)."""
    updates: dict[str, Any] = {}
    for key in stage.local_path_params:
        value = getattr(stage.params, key)
        if isinstance(value, str):
            resolved: Any = local_path(value, base)
        elif isinstance(value, list):
            resolved = [local_path(v, base) if isinstance(v, str) else v for v in value]
        else:
            continue
        if resolved != value:
            updates[key] = resolved
    if updates:
        stage.params = stage.params.model_copy(update=updates)
    return stage


def check_stage_columns(config, where: str | None = None) -> None:
    """Raise ConfigError unless the stages fit together: a source first, every column a
    stage reads written by an earlier stage, no column written twice, names unique."""
    stages = build_stages(config)
    problems: list[tuple[str, str]] = []
    if not isinstance(stages[0], Source):
        problems.append(("stages.0.type", f"the first stage must read the inputs (a source "
                         f"such as ingest_images), not {stages[0].type!r}"))
    written: dict[str, int] = {}
    names: dict[str, int] = {}
    model_stage: Stage | None = None
    videos = getattr(stages[0], "media_kind", None) == "video"
    cut: int | None = None
    for i, stage in enumerate(stages):
        if cuts_clips(stage):
            cut = i
            if not videos:
                problems.append((f"stages.{i}.type", f"{stage.type} cuts videos; the first "
                                 "stage must be ingest_videos"))
        needs_frames = stage.needs_pixels() or isinstance(stage, ModelStage)
        if videos and cut is None and needs_frames and i:
            problems.append((f"stages.{i}", f"{stage.type} works on frames; put split_clips "
                             "before it (it hands each clip's frames to the stages after)"))
        if stage.needs_pixels() and not stage.own_pool and model_stage is not None:
            problems.append((f"stages.{i}", f"{stage.type} works on decoded pixels, which "
                             f"stay in the decoding pool; move it before {model_stage.name} "
                             "(model stages run on pools of their own)"))
        if stage.own_pool and model_stage is None:
            model_stage = stage
        if i and isinstance(stage, Source):
            problems.append((f"stages.{i}.type", "only the first stage may be a source"))
        if stage.name in names:
            problems.append((f"stages.{i}.name", f"name {stage.name!r} is already used by "
                             f"stages.{names[stage.name]}; give one of them another name"))
        if stage.name == REVIEW_STAGE:
            problems.append((f"stages.{i}.name", f"name {REVIEW_STAGE!r} is reserved for "
                             "people's verdicts; give the stage another name"))
        names[stage.name] = i
        problems += [(f"stages.{i}.{key}", reason) for key, reason in stage.config_problems()]
        for column in stage.reads():
            if column not in written:
                key = _param_naming(stage, column)
                path = f"stages.{i}.{key}" if key else f"stages.{i}"
                known = ", ".join(sorted(written)) or "nothing"
                problems.append((path, f"{stage.type} reads column {column!r}, which no "
                                 f"earlier stage writes (earlier stages write: {known})"))
        for column in stage.written_names():
            if column in written and written[column] != i:
                problems.append((f"stages.{i}", f"column {column!r} is also written by "
                                 f"stages.{written[column]}"))
            written[column] = i
    for column in [*FINAL_COLUMNS, *REVIEW_COLUMNS,
                   *(c for c in written if c.startswith(Stage.STAMP_PREFIX))]:
        if column in written:
            problems.append((f"stages.{written[column]}", f"column {column!r} is reserved"))
    if problems:
        raise ConfigError(problems, where)


def _param_naming(stage: Stage, column: str) -> str | None:
    for key, value in stage.params:
        if value == column:
            return key
    return None


def table_schema(stages: list[Stage]) -> pa.Schema:
    fields: dict[str, pa.DataType] = {}
    for stage in stages:
        fields.update(stage.writes())
    chain = [s for s in stages if isinstance(s, (Source, RowStage))]
    fields.update({s.stamp_column: pa.string() for s in chain[shaping(chain):]})
    fields.update(FINAL_COLUMNS)
    fields.update(REVIEW_COLUMNS)
    return pa.schema(list(fields.items()))


def _hash(body) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def shaping(chain: list[Stage]) -> int:
    """How many stages of the chain (source and row stages) decide what the rows are: the
    source and every stage up to the last fan-out. A change to one of them redoes its
    inputs whole; each later row stage stamps the rows it computes (`stamps`) and is
    recomputed on its own."""
    fan_outs = [i for i, s in enumerate(chain) if isinstance(s, FanOut)]
    return (fan_outs[-1] if fan_outs else 0) + 1


def row_stages_hash(source: Stage, row_stages: list[Stage]) -> str:
    """The fingerprint of the stages that decide the rows (see `shaping`)."""
    chain = [source, *row_stages]
    return _hash([{"type": s.type, **s.row_fingerprint()} for s in chain[:shaping(chain)]])


def segments(chain: list[Stage]) -> list[list[Stage]]:
    """Split the source and row stages into actor pools: the source and the stages that
    follow it decode and work on pixels in the first pool; every own-pool stage (a model)
    starts a pool of its own, which the cheap stages after it join. A next own-pool stage
    with the same `pool_key` (the same model) joins it too and shares the loaded model."""
    out: list[list[Stage]] = [[chain[0]]]
    for stage in chain[1:]:
        key = _pool_key(stage)
        shares = key is not None and _pool_key(out[-1][0]) == key
        if stage.own_pool and not shares:
            out.append([stage])
        else:
            out[-1].append(stage)
    return out


def _pool_key(stage: Stage):
    return stage.pool_key if isinstance(stage, ModelStage) else None


def frame_feeders(chain: list[Stage], index: int) -> list[Stage]:
    """On clips: the earlier image stages whose per-frame columns `chain[index]` (an image
    stage) reads in a run, directly or through another of them. A run keeps per-frame
    columns only within a run of image stages in one pool
    (`curate.engine.workers.SegmentWorker._stages`); past a pool's end or a stage that
    takes whole clips, a stage sees the clip's reduced value, which is stored."""
    rows = [s for s in chain if isinstance(s, (Source, RowStage))]  # as the pools hold them
    stage = chain[index]
    if (not isinstance(stage, RowStage) or stage.takes_clips
            or not any(cuts_clips(s) for s in chain[:index])):
        return []
    pool = next(p for p in segments(rows) if any(s is stage for s in p))
    group: list[Stage] = []
    for earlier in reversed(pool[:next(k for k, s in enumerate(pool) if s is stage)]):
        if not isinstance(earlier, RowStage) or earlier.takes_clips or \
                isinstance(earlier, FanOut):
            break
        group.append(earlier)
    reads = set(stage.reads())
    found: list[Stage] = []
    for earlier in group:  # nearest first
        if reads & set(earlier.written_names()):
            found.append(earlier)
            reads |= set(earlier.reads())
    return found[::-1]


def stamps(chain: list[Stage]) -> dict[str, str]:
    """What each row stage after the shaping ones stamps on the rows it computes:
    `ROW/VERDICT`, where ROW is a hash of its row fingerprint and of the ROW parts of the
    stamped stages whose columns it reads (its lineage: a new embedding model recomputes
    the scores made from the embeddings), and VERDICT a hash of its verdict fingerprint
    (its thresholds: when only they change, verdicts are decided again from the stored
    scores)."""
    out: dict[str, str] = {}
    made_by: dict[str, str] = {}
    first = shaping(chain)
    for index in range(first, len(chain)):
        stage = chain[index]
        lineage = sorted({made_by[c] for c in stage.reads() if c in made_by})
        body = {"type": stage.type, **stage.row_fingerprint(), "reads": lineage}
        # on clips, a column read per frame makes other values than the clip's mean
        per_frame = {c for s in frame_feeders(chain, index) for c in s.written_names()
                     if c in stage.reads()}
        if per_frame:
            body["per_frame"] = sorted(per_frame)
        row = _hash(body)
        out[stage.name] = f"{row}/{_hash(stage.verdict_fingerprint())}"
        for column in stage.written_names():
            made_by[column] = row
    return out


def readers(chain: list[Stage]) -> dict[str, list[Stage]]:
    """For each stamped stage, the later stamped stages that read its columns, directly or
    through another reader: a row it computes again must be computed again by them."""
    stamped = chain[shaping(chain):]
    out: dict[str, list[Stage]] = {}
    for i, stage in enumerate(stamped):
        columns = set(stage.written_names())
        found: list[Stage] = []
        for later in stamped[i + 1:]:
            if columns & set(later.reads()):
                found.append(later)
                columns |= set(later.written_names())
        out[stage.name] = found
    return out


def skip_verdicts(chain: list[Stage], index: int) -> list[str] | None:
    """For a row stage that skips dropped rows: the verdict columns that decide whether a
    row is still alive when it comes to `chain[index]` (those of the row stages before it;
    a global verdict, such as a dedup's, is decided after the row stages, except where
    the stage decides it at row time: clip_score's min_score). None for a
    stage that computes every row."""
    stage = chain[index]
    if not (isinstance(stage, RowStage) and stage.skips_dropped):
        return None
    return [s.verdict_column for s in chain[:index]
            if s.verdict_column and (not isinstance(s, GlobalStage) or s.verdict_at_row_time)]
