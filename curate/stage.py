"""The Stage base class: what a stage reads, writes and computes. No Ray here."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from curate.media import objstore

if TYPE_CHECKING:
    from curate.parts import GlobalResult


class Resources(BaseModel):
    """How the engine schedules a stage's row work."""

    model_config = ConfigDict(extra="forbid")

    cpus: float = Field(1.0, gt=0, description="CPUs per worker")
    gpus: float = Field(0.0, ge=0, description="GPUs per worker")
    batch_size: int = Field(32, ge=1, description="rows per batch handed to a worker")
    concurrency: int | None = Field(
        None, ge=1, description="workers in the pool (default: one per CPU in the cluster)"
    )


class StageParams(BaseModel):
    """Fields every stage accepts; each stage adds its own."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(description="registered stage type")
    name: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9_-]{0,63}$",
                             description="name used in reasons, reports and the column "
                             "stamp_<name> (default: type); letters, digits, _ and -. A new "
                             "name is a new stage: its columns are computed again")
    resources: Resources = Field(default_factory=Resources)


class ObjectStoreParams(StageParams):
    """The params of a stage that may name URIs in object storage."""

    storage_options: Annotated[dict[str, str], AfterValidator(objstore.checked)] = Field(
        default_factory=dict,
        description="how to reach the s3:// (gs://, az://) URIs this stage names: the keys "
        "the store takes (aws_endpoint, aws_region, aws_access_key_id, "
        "aws_secret_access_key, allow_http, anonymous, ...) and max_retries / "
        "retry_timeout_s; empty: the environment's credentials",
    )


class FrameScoreParams(StageParams):
    """Params of a stage that scores images and, on video clips, each sampled frame."""

    reduction: Literal["min", "mean", "max"] | None = Field(
        None, description="on video clips: how the scores of a clip's frames become the "
        "clip's (default: the stage's own; see curate.frames)")


class Stage:
    """A step of a pipeline. A stage is one (or two) of these roles, each a base class below;
    the engine asks the role, nothing else:

    - `Source`: lists the inputs and loads each into any number of rows (first stage).
    - `RowStage`: `process(batch, images)` gives new columns for the same rows.
    - `ModelStage`: a RowStage whose model runs on a pool of its own (GPU-ready): `prepare`
      turns pixels into model inputs where they are decoded, `setup` loads the model on
      the worker, `process` runs it.
    - `FanOut`: a RowStage whose `expand` turns each row into any number of rows (a video
      into clips), handed on in blocks.
    - `GlobalStage`: `global_part(ex)` works over the whole table through the executor's
      scans and shuffles (no process holds all rows). A stage may be a RowStage and a
      GlobalStage (a per-row hash, then dedup over all hashes).

    Heavy state loads in `setup()`, on the worker; constructors stay cheap and picklable.
    Filters never delete rows: a filter writes its verdict to `verdict_column` (null when
    the row passes, else the reason) and the engine derives `selected` and
    `reject_reason` from the verdicts in stage order (curate.verdicts).
    """

    type: ClassVar[str]
    Params: ClassVar[type[StageParams]]
    #: Column holding this stage's verdict; null = passes. None for stages that never drop.
    verdict_column: ClassVar[str | None] = None
    #: Text put before a verdict in `reject_reason` (dedup verdicts are sample ids).
    verdict_prefix: ClassVar[str] = ""
    #: True for stages whose verdict is the sample_id of the kept copy.
    marks_duplicates: ClassVar[bool] = False
    #: Prefix of the columns `prepare` hands from the decode pool to a model pool
    #: (dropped before rows are stored).
    PREPARED_PREFIX: ClassVar[str] = "_prepared:"
    #: Prefix of the column where a row stage stamps each row it computed with what
    #: computed it (curate.plan.stamps); null on rows it skipped or never saw.
    STAMP_PREFIX: ClassVar[str] = "stamp_"
    #: Params naming local files or directories (a path or a list of paths): a run makes
    #: them absolute where it starts (`curate.plan.build_stages`), before the stages
    #: travel to workers whose working directory is another; URLs and hub ids stay as they
    #: are. Fingerprints keep the paths as the config wrote them.
    local_path_params: ClassVar[tuple[str, ...]] = ()
    #: How this stage's scores of a clip's frames become the clip's by default.
    default_reduction: ClassVar[str] = "mean"

    def __init__(self, params: StageParams | None = None, **kwargs: Any):
        if params is None:
            kwargs.setdefault("type", self.type)
            params = self.Params(**kwargs)
        elif kwargs:
            raise TypeError("pass either a params object or keyword arguments, not both")
        self.params = params
        #: The params as the config wrote them (`params` may hold resolved local paths).
        self.configured_params = params
        #: Facts a global stage reports about its last run (printed and recorded).
        self.report: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.params.name or self.type

    @property
    def resources(self) -> Resources:
        return self.params.resources

    @property
    def stamp_column(self) -> str:
        return self.STAMP_PREFIX + self.name

    # --- schema -------------------------------------------------------------------------
    def reads(self) -> tuple[str, ...]:
        """Columns this stage needs from earlier stages."""
        return ()

    def writes(self) -> dict[str, pa.DataType]:
        """Columns this stage adds, with their Arrow types."""
        return {}

    def written_names(self) -> tuple[str, ...]:
        """Names of the columns this stage adds (without resolving their types, which for
        a model may mean reading its config)."""
        return tuple(self.writes())

    def needs_pixels(self) -> bool:
        """Whether the row part uses decoded images."""
        return False

    # --- before a run -------------------------------------------------------------------
    def preflight(self) -> list[tuple[str, str]]:
        """Problems to report before any work starts, as (param, reason): e.g. a model
        path that does not exist. Runs where the pipeline runs, not at config parsing."""
        return []

    def notices(self) -> list[str]:
        """Warnings printed with every run of this stage (e.g. a stand-in model)."""
        return []

    def models(self) -> list[dict[str, str]]:
        """Models this stage uses: {"model": id, "revision": ...}; kept in the run record."""
        return []

    def plan(self, later: list[Stage]) -> None:
        """Called when a pipeline is built, with the stages that come after this one (e.g.
        a video splitter keeps no frames when no later stage looks at them)."""

    def unfinished(self, rows: pa.Table) -> pa.Array | None:
        """Rows (of `rows`, which hold this stage's columns) whose result must be computed
        again by the next run, so left unstamped: an engine that failed on them. None:
        every computed row is finished."""
        return None

    def extras(self) -> tuple[str, ...]:
        """The extras of curate's package this stage needs where it runs (`curate submit`
        installs their requirements on the cluster): models, video, vllm, ..."""
        return ()

    def config_problems(self) -> list[tuple[str, str]]:
        """(param key, reason) of what is wrong with this stage's params in its pipeline,
        once every stage is planned (`plan`); checked with the config, before any work."""
        return []

    # --- work ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Load heavy state; called once per worker before the first batch."""

    @property
    def own_pool(self) -> bool:
        """Whether the row part runs on a pool of its own (see `ModelStage`)."""
        return False

    def reduction(self) -> str:
        """min, mean or max: how a clip's frame scores become the clip's."""
        return getattr(self.params, "reduction", None) or self.default_reduction

    def verdicts(self, rows: pa.Table, columns: dict[str, pa.Array]) -> pa.Array | None:
        """The verdict of each row from its (clip-reduced) `columns`; None where the stage
        cannot tell (then a clip fails when any frame fails)."""
        return None

    # --- review queues (curate.queues): how close a duplicate is to its kept copy ---------
    def pair_columns(self) -> tuple[str, ...]:
        """For a stage that `marks_duplicates` by a distance: the stored columns the
        distance between a row and its kept copy is computed from (none: no queue of its
        pairs)."""
        return ()

    def pair_limit(self) -> float | None:
        """The distance under which this stage calls two rows copies."""
        return None

    def pair_distances(self, rows: pa.Table, kept: pa.Table) -> np.ndarray:
        """Distances between rows[i] and kept[i], from `pair_columns` (NaN where a value
        is missing)."""
        raise NotImplementedError

    def nearest_columns(self) -> tuple[str, str] | None:
        """For a dedup stage that records each row's nearest other row it compared: the
        columns of that row's id and of the distance to it (the pairs just past the
        limit are a review queue)."""
        return None

    def fingerprint(self) -> dict[str, Any]:
        """What determines this stage's output (used to decide what must be recomputed)."""
        # how the stage reaches object storage never changes what it computes
        fingerprint = self.configured_params.model_dump(
            mode="json", exclude={"resources", "name", "storage_options"})
        if fingerprint.get("reduction", "") is None:
            del fingerprint["reduction"]  # unset: tables of earlier releases stay current
        return fingerprint

    def row_fingerprint(self) -> dict[str, Any]:
        """What determines the row part's output; rows are recomputed when it changes."""
        return self.fingerprint()

    def verdict_fingerprint(self) -> dict[str, Any]:
        """What decides the verdict from stored columns alone (a score filter's limits):
        when only this changes, verdicts are decided again and nothing is computed."""
        return {}

    def __repr__(self) -> str:
        fields = self.params.model_dump(exclude_defaults=True, exclude={"type"})
        args = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"{type(self).__name__}({args})"


class RowStage(Stage):
    """New columns for the same rows, computed batch by batch where the rows stream."""

    #: True for a stage that takes a clip whole (`Clip` media: several frames), e.g. a VLM
    #: prompted with the frames; other stages see each frame as a row of its own and their
    #: columns are reduced per clip (curate.frames).
    takes_clips: ClassVar[bool] = False
    #: True for expensive stages that skip rows an earlier row stage already dropped
    #: (they get nulls): no GPU time on rows that are out. Global verdicts (dedup) come
    #: after the row stages, so rows they drop are still computed.
    skips_dropped: ClassVar[bool] = False

    def process(self, batch: pa.Table, images: list) -> dict[str, pa.Array]:
        """New columns for `batch` (images[i] is a PIL RGB image or None)."""
        raise NotImplementedError


@dataclass(frozen=True)
class Threshold:
    """A limit on a score column: rows under `minimum` or over `maximum` fail, with the
    reason `label 3.21 < 5` (or `>`). A limit left None is not checked."""

    column: str
    label: str
    minimum: float | None = None
    maximum: float | None = None


class ScoreFilter(RowStage):
    """A row stage that scores rows and drops those outside limits. Its author writes
    `score()` (the score columns of a batch) and `thresholds()` (the limits its params
    set); the base turns the scores into the verdict in `verdict_column`, from the scores
    as they are stored (and, on clips, from each clip's reduced scores alike). A stage
    whose checks are not simple limits overrides `verdicts()` instead."""

    def score(self, batch: pa.Table, images: list) -> dict[str, pa.Array]:
        """The score columns of `batch` (images[i] is a PIL RGB image or None)."""
        raise NotImplementedError

    def thresholds(self) -> list[Threshold]:
        return []

    def verdict_reads(self) -> tuple[str, ...]:
        """The columns `verdicts` reads: the scores its limits are on (and, for a stage
        that overrides `verdicts`, whatever else it looks at)."""
        return tuple(dict.fromkeys(t.column for t in self.thresholds()))

    #: Params that only limit scores (they feed `thresholds` or `verdicts`, never `score`):
    #: changing them decides verdicts again from the stored scores, with no decode and no
    #: model call.
    threshold_params: ClassVar[tuple[str, ...]] = ()

    def row_fingerprint(self) -> dict[str, Any]:
        fingerprint = super().row_fingerprint()
        for key in self.threshold_params:
            fingerprint.pop(key, None)
        return fingerprint

    def verdict_fingerprint(self) -> dict[str, Any]:
        values = self.configured_params.model_dump(mode="json", include=set(self.threshold_params))
        return {k: v for k, v in values.items() if v is not None}

    def process(self, batch: pa.Table, images: list) -> dict[str, pa.Array]:
        columns = self.score(batch, images)
        assert self.verdict_column is not None
        return {**columns, self.verdict_column: self.verdicts(batch, columns)}

    def verdicts(self, rows: pa.Table, columns: dict[str, pa.Array]) -> pa.Array:
        """Each row's failed limits, joined by `; `, or null (null scores fail nothing)."""
        reasons: list[str | None] = [None] * rows.num_rows
        for limit in self.thresholds():
            if limit.minimum is None and limit.maximum is None:
                continue
            values = columns[limit.column]
            values = values.to_numpy(zero_copy_only=False).astype(np.float32)
            for i in np.flatnonzero(~np.isnan(values)):
                value = float(values[i])
                if limit.minimum is not None and value < limit.minimum:
                    reason = f"{limit.label} {value:.4g} < {limit.minimum:g}"
                elif limit.maximum is not None and value > limit.maximum:
                    reason = f"{limit.label} {value:.4g} > {limit.maximum:g}"
                else:
                    continue
                reasons[i] = reason if reasons[i] is None else f"{reasons[i]}; {reason}"
        return pa.array(reasons, pa.string())


class ModelStage(RowStage):
    """A row stage whose model runs on a pool of its own (GPU-ready, sized by `resources`):
    `prepare` runs where the images are decoded (resize and crop for the model) and its
    result travels to `process` on the model's pool as `prepared_column`."""

    @property
    def own_pool(self) -> bool:
        """True unless the params say no model runs (the stage then works where it is)."""
        return True

    @property
    def pool_key(self):
        """Model stages with the same (non-None) key share one pool, so a model they both
        use loads once per worker."""
        return None

    @property
    def prepared_column(self) -> str:
        return self.PREPARED_PREFIX + self.name

    def prepare(self, batch: pa.Table, images: list) -> pa.Array:
        """CPU part, run where the images are decoded; one value per row."""
        raise NotImplementedError


class FanOut(RowStage):
    """One row in, any number out: `expand` hands on the rows that replace a batch's rows
    (each keeping its `input_id`, with a stable `sample_id` of its own) in blocks, so one
    long input never sits whole in memory; the engine re-balances batches after it."""

    #: True for a stage that turns videos into clips (media with sampled frames).
    makes_clips: ClassVar[bool] = False

    @property
    def block_rows(self) -> int:
        """Rows the engine hands on together after this stage, at least (the next pools'
        batches are cut from them)."""
        return 1

    def expand(self, rows: pa.Table,
               media: list | None) -> Iterator[tuple[pa.Table, list | None]]:
        """Blocks of (rows, their media). Every row carries `input_rows`: how many rows its
        input has (on rows before the input's last, a lower bound is enough: a resumed run
        then knows the input is not complete)."""
        raise NotImplementedError

    def reloads_rows_from(self, source: Source) -> bool:
        """True where `reload` can make a stored row's media again from its columns and
        its input (read through `source`), so a new or changed stage after this one
        computes only its own columns; False: the row's input is read again whole."""
        return False

    def reload(self, rows: pa.Table, source: Source) -> tuple[list, list[str | None]]:
        """Worker side: as `Source.reload`, for rows this stage made."""
        raise NotImplementedError


def count_input_rows(input_ids: pa.Array | pa.ChunkedArray) -> pa.Array:
    """For each row, how many rows its input has: a resumed run can tell an input whose
    rows were all committed from one cut off midway."""
    if isinstance(input_ids, pa.ChunkedArray):
        input_ids = input_ids.combine_chunks()
    codes = pc.dictionary_encode(input_ids).indices.to_numpy()
    return pa.array(np.bincount(codes)[codes] if len(codes) else [], pa.int32())


def cuts_clips(stage: Stage) -> bool:
    """True for the stage that turns videos into clips (a `FanOut` that `makes_clips`)."""
    return isinstance(stage, FanOut) and stage.makes_clips


class GlobalStage(Stage):
    """Work over the table: new columns computed over the rows no earlier stage dropped."""

    @property
    def verdict_at_row_time(self) -> bool:
        """True for a stage that is also a row stage and decides its verdict as each row
        is computed (so the stages after it may skip the rows it drops)."""
        return False

    def global_part(self, ex) -> GlobalResult:
        """New columns, from the rows `ex.scan` returns, with the executor's scans, maps and
        shuffles (curate.engine.executor). Rows left out of the result get the defaults or
        null (an earlier stage's reason stands for the rows it dropped)."""
        raise NotImplementedError

    def run_global(self, table: pa.Table, alive: pa.Array) -> dict[str, pa.Array]:
        """The global part in this process over `table` (`alive` marks the rows no earlier
        stage dropped): new columns for every row."""
        from curate.parts import MemoryExecutor

        ex = MemoryExecutor(table, alive)
        return ex.columns(self.global_part(ex))

class Source(Stage):
    """The first stage: lists the inputs and reads each into any number of rows.

    Every row carries `input_id` (the input it came from) and a `sample_id` that is stable
    across runs (for an image, its input_id; for a clip, derived from the input and the
    clip's place in it). An input that cannot be read is one row with `error`. Work is
    decided and redone per input: redoing an input replaces all of its rows.
    """

    #: What the inputs are: "image" or "video".
    media_kind: ClassVar[str] = "image"

    def list_entries(self) -> list[dict[str, Any]]:
        """Driver side: the listing as small units of work for the workers (cheap: no
        directory walks or manifest reads here); raises RunError for unusable entries."""
        raise NotImplementedError

    def list_entry(self, unit: dict[str, Any]) -> pa.Table:
        """Worker side: the inputs of one unit; columns `input_id`, `uri`, `_order` (earlier
        wins when an input is listed twice) and whatever `load` needs."""
        raise NotImplementedError

    def entry_count(self, units: list[dict[str, Any]]) -> int:
        """How many entries the config lists (units of `list_entries` carry their entry's
        number in `index`); an entry that lists nothing is an error."""
        return len(units)

    def empty_entry(self, index: int) -> str:
        """The error for path entry `index` when it listed nothing."""
        return f"{self.name}: entry {index} lists no inputs"

    def load(self, items: pa.Table) -> tuple[pa.Table, list]:
        """Worker side: the rows of these inputs (any number per input) and the decoded
        media of each row (None where it failed)."""
        raise NotImplementedError

    @property
    def reloads_rows(self) -> bool:
        """True for a source whose stored rows `reload` can decode again one by one (so a
        new or changed stage computes only its own columns); False where a row is a
        piece of its input (a clip): the fan-out stage that made it reads it again
        (`FanOut.reloads_rows_from`), or else its input is read again whole."""
        return False

    def reload(self, rows: pa.Table) -> tuple[list, list[str | None]]:
        """Worker side: the decoded media of stored rows (columns of `writes`; None where
        the row has an error), and why each row could not be read again (None where it
        could, or where it already had an error), in the words of a row's `error`: the
        engine writes it there, as a run reading the input now would."""
        raise NotImplementedError


def first_of_each_input(items: pa.Table) -> pa.Table:
    """Each input of a listing (`Source.list_entry`'s tables) once: the first listed, as
    earlier path entries win, in listing order."""
    if items.num_rows == 0:
        return items
    items = items.sort_by([("_order", "ascending")])
    ids = items["input_id"].combine_chunks()
    encoded = pc.dictionary_encode(ids).indices.to_numpy()
    _, first = np.unique(encoded, return_index=True)
    return items.take(pa.array(np.sort(first)))
