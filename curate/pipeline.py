"""Pipeline: an ordered list of stages over one store, built in Python or loaded from YAML;
validated before any work starts (curate.plan). The facade of `curate run` and `curate
export` for notebooks and services."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from curate.config import Config, RunConfig, StoreConfig, load_config
from curate.plan import build_stages
from curate.stage import Stage


class Pipeline:
    """Stages over a store, built in Python or loaded from YAML; both run the same way.

    >>> from curate import Pipeline
    >>> from curate.stages import IngestImages, ImageQuality, ExactDedup
    >>> p = Pipeline("demo", [IngestImages(paths=["examples/media"]), ImageQuality(min_side=64),
    ...                       ExactDedup()], store={"uri": "./curate_data"})
    """

    def __init__(
        self,
        name: str,
        stages: list[Stage],
        store: StoreConfig | dict[str, Any] | str | None = None,
        run: RunConfig | dict[str, Any] | None = None,
    ):
        if isinstance(store, str):
            store = {"uri": store}
        raw = {
            "name": name,
            "store": store.model_dump() if isinstance(store, StoreConfig) else (store or {}),
            "run": run.model_dump() if isinstance(run, RunConfig) else (run or {}),
            "stages": [s.params.model_dump(mode="json", exclude_unset=True) | {"type": s.type}
                       for s in stages],
        }
        self.config = load_config(raw)
        self.stages = build_stages(self.config)

    @classmethod
    def from_config(cls, config: Config) -> Pipeline:
        self = cls.__new__(cls)
        self.config = config
        self.stages = build_stages(config)
        return self

    @property
    def name(self) -> str:
        return self.config.name

    def run(self, progress: bool = True, address: str | None = None,
            force_after_s: float | None = None):
        """Run (or resume) the pipeline; returns a RunSummary. Another run on the same table
        is refused while it lives; `force_after_s` takes over one silent that long."""
        from curate.engine.run import execute

        return execute(self._with_address(address), progress=progress,
                       force_after_s=force_after_s)

    def _with_address(self, address: str | None) -> Config:
        if address is None:
            return self.config
        return self.config.model_copy(
            update={"run": self.config.run.model_copy(update={"ray_address": address})})

    def plan(self, address: str | None = None):
        """What a run would compute, per stage and why, without doing it (a RunPlan)."""
        from curate.engine.run import plan_run

        return plan_run(self._with_address(address))

    def export(self, out: str | Path, format: str = "webdataset", progress: bool = False,
               address: str | None = None, **options: Any):
        """Export this pipeline's table for training (see `curate export`); `options` are
        ExportOptions' fields (where, all, limit, seed, shard_size, buckets, ...). Returns
        an ExportSummary."""
        from curate.export import export

        return export(self.config.store, {"out": str(out), "format": format, **options},
                      progress=progress, address=address or self.config.run.ray_address)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, {self.stages!r})"
