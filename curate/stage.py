"""The Stage base class: what a stage reads, writes and computes. No Ray here."""

from __future__ import annotations

from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field


class Resources(BaseModel):
    """How the runner schedules a stage's row work."""

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
    name: str | None = Field(None, description="name used in reasons and reports (default: type)")
    resources: Resources = Field(default_factory=Resources)


class Stage:
    """A step of a pipeline.

    A stage may have a row part (`process`: called on a batch, returns its new columns for
    the same rows) and/or a global part (`run_global`: sees the columns it reads for all
    rows at once). Heavy state loads in `setup()`, on the worker; constructors stay cheap
    and picklable.

    Filters never delete rows: a filter writes its verdict to `verdict_column` (null when
    the row passes, else the reason) and the pipeline derives `selected` and
    `reject_reason` from the verdicts in stage order.
    """

    type: ClassVar[str]
    Params: ClassVar[type[StageParams]]
    #: Column holding this stage's verdict; null = passes. None for stages that never drop.
    verdict_column: ClassVar[str | None] = None
    #: Text put before a verdict in `reject_reason` (dedup verdicts are sample ids).
    verdict_prefix: ClassVar[str] = ""
    #: True for stages whose verdict is the sample_id of the kept copy.
    marks_duplicates: ClassVar[bool] = False
    #: True for the stage that lists and reads the inputs (first in a pipeline).
    is_source: ClassVar[bool] = False
    #: True for expensive stages that skip rows an earlier row stage already dropped
    #: (they get nulls): no GPU time on rows that are out. Global verdicts (dedup) come
    #: after the row stages, so rows they drop are still computed.
    skips_dropped: ClassVar[bool] = False
    #: Prefix of the columns `prepare` hands from the decode pool to a model pool
    #: (dropped before rows are stored).
    PREPARED_PREFIX: ClassVar[str] = "_prepared:"

    def __init__(self, params: StageParams | None = None, **kwargs: Any):
        if params is None:
            kwargs.setdefault("type", self.type)
            params = self.Params(**kwargs)
        elif kwargs:
            raise TypeError("pass either a params object or keyword arguments, not both")
        self.params = params
        #: Facts a global stage reports about its last run (printed and recorded).
        self.report: dict[str, Any] = {}

    @property
    def name(self) -> str:
        return self.params.name or self.type

    @property
    def resources(self) -> Resources:
        return self.params.resources

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

    @property
    def own_pool(self) -> bool:
        """Whether the row part runs on its own actor pool (models: GPU-ready, sized by
        `resources`) instead of in the pool that decodes the images."""
        return False

    @property
    def pool_key(self):
        """Own-pool stages with the same (non-None) key share one pool, so a model they
        both use loads once per worker."""
        return None

    @property
    def prepared_column(self) -> str:
        return self.PREPARED_PREFIX + self.name

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

    # --- work ---------------------------------------------------------------------------
    def setup(self) -> None:
        """Load heavy state; called once per worker before the first batch."""

    @property
    def has_row_part(self) -> bool:
        return type(self).process is not Stage.process

    @property
    def has_global_part(self) -> bool:
        return type(self).run_global is not Stage.run_global

    @property
    def has_prepare_part(self) -> bool:
        return type(self).prepare is not Stage.prepare

    def prepare(self, batch: pa.Table, images: list) -> pa.Array:
        """CPU part of an own-pool stage, run where the images are decoded (e.g. resize and
        crop for a model). Its result travels to `process` as `prepared_column`."""
        raise NotImplementedError

    def process(self, batch: pa.Table, images: list) -> dict[str, pa.Array]:
        """Row part: new columns for `batch` (images[i] is a PIL RGB image or None)."""
        raise NotImplementedError

    def run_global(self, table: pa.Table, alive: pa.Array) -> dict[str, pa.Array]:
        """Global part: new columns for every row of `table`.

        `alive` marks the rows no earlier stage dropped; rows that are not alive must get
        a null verdict (the earlier stage's reason stands).
        """
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """What determines this stage's output (used to decide what must be recomputed)."""
        return self.params.model_dump(mode="json", exclude={"resources", "name"})

    def row_fingerprint(self) -> dict[str, Any]:
        """What determines the row part's output; rows are recomputed when it changes."""
        return self.fingerprint()

    def __repr__(self) -> str:
        fields = self.params.model_dump(exclude_defaults=True, exclude={"type"})
        args = ", ".join(f"{k}={v!r}" for k, v in fields.items())
        return f"{type(self).__name__}({args})"
