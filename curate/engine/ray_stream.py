"""The row stream on Ray: Ray Data actor pools run the segments of the chain
(curate.engine.workers), and the last step writes the rows as Lance fragments on the
workers (curate.table.fragments). Table-wide work runs as tasks, in curate.engine.tasks."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator

import pyarrow as pa

from curate.engine.inflight import WORKER_RETRIES
from curate.engine.pools import plan_pools
from curate.engine.tasks import blocks
from curate.engine.workers import FanOutWorker, SegmentWorker, worker_options
from curate.plan import segments
from curate.stage import FanOut, Stage

log = logging.getLogger(__name__)


#: CPUs the fragment writers reserve (they mostly wait on storage).
WRITER_CPUS = 0.25


def stream_fragments(
    backend, parts: list, counts: list[int], stages: list[Stage], row_stages_hash: str,
    stamps: dict[str, str], writer, write_rows: int, inflight=None,
    planned: list | None = None,
) -> Iterator[pa.Table]:
    """Run the source and row stages over the listed inputs (`parts` in the object store)
    on Ray Data actor pools (one for decoding, one per model), then write the rows as
    fragments on the workers; yield each written fragment's metadata as it completes.
    `planned` receives the pools' sizes (curate.engine.pools)."""
    import ray

    pools = segments(stages)
    cluster = ray.cluster_resources()
    have = cluster.get("CPU", 1)
    sizes = plan_pools(pools, have, cluster.get("GPU", 0), sum(counts))
    if planned is not None:
        planned[:] = sizes
    wanted = sum(s.cpus * s.workers for s in sizes) + WRITER_CPUS
    scale = 1.0
    if wanted > have:
        # Every pool must be able to start or the stream never flows: on a machine with
        # fewer CPUs than pools, share them out (Ray's CPU counts are for scheduling).
        log.info("pools ask for %s CPUs, the cluster has %s; scaling down", wanted, have)
        scale = have / wanted * 0.99  # float sums must not exceed what the cluster has
        sizes = [dataclasses.replace(s, cpus=s.cpus * scale) for s in sizes]
    # Small blocks keep work spread over the pool and results flowing back steadily;
    # capping their number keeps the driver's bookkeeping small on huge inputs.
    block_rows = max(sizes[0].batch_size, math.ceil(sum(counts) / 4000))
    # cut by tasks up front: a repartition operator would need a CPU the pools hold
    dataset = ray.data.from_arrow_refs(blocks(backend, parts, counts, block_rows))
    options = worker_options(pools, stages, row_stages_hash, stamps, inflight)
    for i, (pool, size) in enumerate(zip(pools, sizes)):
        # A model on CPU is the slow step while decoding mostly waits for it: give each of
        # its workers a share of all the cores for threads, not only the CPUs it reserved.
        threads = max(1, int(have // size.workers)) if i and not size.gpus else None
        fans_out = any(isinstance(s, FanOut) for s in pool)
        dataset = dataset.map_batches(
            FanOutWorker if fans_out else SegmentWorker,
            fn_constructor_kwargs={"stages": pool, "threads": threads, "name_worker": True,
                                   **options[i]},
            batch_size=size.batch_size,
            batch_format="pyarrow",
            compute=size.strategy(),
            num_cpus=size.cpus,
            num_gpus=size.gpus or None,
            # a dead worker is replaced and its batch tried again, a few times: a batch
            # that kills every worker it meets must end the run, not loop (curate.engine.inflight)
            max_task_retries=WORKER_RETRIES,
        )
    # Tasks, not an actor pool: the writer holds no state worth keeping, and an actor pool
    # of writers behind the model pools received no work in Ray 2.60 here.
    dataset = dataset.map_batches(
        writer,
        batch_size=write_rows,
        batch_format="pyarrow",
        num_cpus=WRITER_CPUS * scale,
    )
    yield from dataset.iter_batches(batch_size=None, batch_format="pyarrow")
