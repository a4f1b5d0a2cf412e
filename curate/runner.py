"""The only module that knows Ray: stages become Ray Data operators here."""

from __future__ import annotations

import logging
import math
import os
import time
import warnings
from collections.abc import Iterator

import pyarrow as pa

from curate.stage import Stage

log = logging.getLogger(__name__)

#: Prefix of the per-stage timing columns that travel back to the driver (never stored).
TIMING_PREFIX = "_seconds:"


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a Ray cluster (`address`) or start a local one; reuse a connection in place."""
    import ray

    # Ray starts its processes with fork+exec; lance warns about fork in general, but exec
    # replaces the child at once, so the warning says nothing about this use.
    warnings.filterwarnings("ignore", message=".*fork.*", category=RuntimeWarning)
    warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")  # set for us inside a Ray job
        if address:
            ray.init(address=address, logging_level=logging.WARNING)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


class RowWorker:
    """A pool worker running the source and the row stages on each batch.

    The stages are fused so an image is decoded once and every stage sees the pixels in
    memory; only the resulting (small) columns leave the worker.
    """

    def __init__(self, stages: list[Stage], row_stages_hash: str):
        self.stages = stages
        self.row_stages_hash = row_stages_hash
        for stage in stages:
            stage.setup()

    def __call__(self, batch: pa.Table) -> pa.Table:
        source, *rest = self.stages
        n = batch.num_rows
        started = time.perf_counter()
        columns, images = source.load(batch)
        out = batch.select(["sample_id", "uri", "alt_text"])
        for name, values in columns.items():
            out = out.append_column(name, values)
        timings = {source.name: time.perf_counter() - started}
        for stage in rest:
            started = time.perf_counter()
            for name, values in stage.process(out, images).items():
                out = out.append_column(name, values)
            timings[stage.name] = time.perf_counter() - started
        out = out.append_column("row_stages_hash", pa.array([self.row_stages_hash] * n))
        for name, seconds in timings.items():
            out = out.append_column(TIMING_PREFIX + name, pa.array([seconds / n] * n))
        return out


def stream_rows(
    items: pa.Table, stages: list[Stage], row_stages_hash: str
) -> Iterator[pa.Table]:
    """Run the fused row stages over `items` on a Ray Data actor pool; yield result batches
    as they complete (in no particular order)."""
    import ray

    batch_size = min(s.resources.batch_size for s in stages)
    cpus = max(s.resources.cpus for s in stages)
    gpus = max(s.resources.gpus for s in stages)
    set_pools = [s.resources.concurrency for s in stages if s.resources.concurrency]
    if set_pools:
        concurrency = min(set_pools)
    else:
        concurrency = max(1, int(ray.cluster_resources().get("CPU", 1) // cpus))
    # Small blocks keep work spread over the pool and results flowing back steadily;
    # capping their number keeps the driver's bookkeeping small on huge inputs.
    block_rows = max(batch_size, math.ceil(items.num_rows / 4000))
    blocks = [items.slice(i, block_rows) for i in range(0, items.num_rows, block_rows)]
    dataset = ray.data.from_arrow(blocks).map_batches(
        RowWorker,
        fn_constructor_kwargs={"stages": stages, "row_stages_hash": row_stages_hash},
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus,
        num_gpus=gpus or None,
    )
    yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
