"""How the actor pools of a run's row stream share the cluster (no Ray here: the cluster
comes in as numbers).

GPU pools are planned together. A pool whose `concurrency` is set gets that many
workers; the others share the GPUs left: each starts from an equal share (in GPUs) and
autoscales between one worker and what the cluster holds once every other GPU pool keeps
its one worker (Ray Data's autoscaling actor pools add workers where batches queue, so
the slowest GPU stage ends up with the most), never more workers than it has batches.
What cannot fit is refused before any work: a worker asking for more GPUs than any node
has (it would wait forever), or GPU pools whose workers (one each, or their concurrency)
cannot all be placed on the nodes' GPUs.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from curate.errors import ConfigError
from curate.stage import FanOut, Stage

#: Float sums of fractional GPUs must not round past what the cluster has.
_EPS = 1e-6


@dataclass(frozen=True)
class PoolSize:
    """How one actor pool is scheduled: per worker, and how many workers."""

    stages: tuple[str, ...]
    batch_size: int
    cpus: float
    gpus: float
    workers: int  # at the start
    min_workers: int
    max_workers: int

    def strategy(self):
        import ray

        if self.min_workers == self.max_workers:
            return ray.data.ActorPoolStrategy(size=self.workers)
        return ray.data.ActorPoolStrategy(min_size=self.min_workers,
                                          max_size=self.max_workers,
                                          initial_size=self.workers)

    def record(self) -> dict:
        return asdict(self) | {"stages": list(self.stages)}


def _per_worker(pool: list[Stage]) -> tuple[int, float, float, int | None]:
    """(batch size, CPUs, GPUs, concurrency or None) of a pool's workers."""
    set_pools = [s.resources.concurrency for s in pool if s.resources.concurrency]
    return (min(s.resources.batch_size for s in pool), max(s.resources.cpus for s in pool),
            max(s.resources.gpus for s in pool), min(set_pools) if set_pools else None)


def _where(pool: list[Stage], index_of: dict[str, int]) -> str:
    stage = max(pool, key=lambda s: s.resources.gpus)
    return f"stages.{index_of[stage.name]}.resources.gpus"


def check_gpus(pools: list[list[Stage]], node_gpus: list[float],
               index_of: dict[str, int], source: str | None = None) -> None:
    """Refuse, in one line per problem, GPU pools the cluster cannot run: a worker bigger
    than every node, or workers (one of each pool, or the `concurrency` it sets) that do
    not all fit on the nodes' GPUs (placed largest first, each on the first node with
    room, as a worker cannot span nodes)."""
    total, largest = sum(node_gpus), max(node_gpus, default=0.0)
    problems = []
    needed = []
    for pool in pools:
        _, _, gpus, concurrency = _per_worker(pool)
        if not gpus:
            continue
        names = " + ".join(s.name for s in pool)
        if gpus > largest + _EPS:
            problems.append((_where(pool, index_of), (
                f"a worker of {names} asks for {gpus:g} GPUs, but no node of the cluster has "
                f"more than {largest:g} (the cluster has {total:g}); lower resources.gpus "
                "or add a node with that many") if largest else (
                f"{names} asks for GPUs, but the cluster has none; start nodes with GPUs "
                "(`ray start --num-gpus N`) or set resources.gpus: 0")))
        needed.append((names, gpus, concurrency or 1))
    if not problems and not _placed(needed, node_gpus):
        asked = ", ".join(f"{names}: {count} x {gpus:g}" for names, gpus, count in needed)
        nodes = ", ".join(f"{n:g}" for n in sorted(node_gpus, reverse=True) if n)
        problems.append(("resources.gpus", (
            f"the GPU stages' workers ({asked}; one each, or their concurrency) do not fit "
            f"the GPUs of the cluster's nodes ({nodes}; {total:g} in all). Lower their "
            "resources.gpus or concurrency, or add GPUs")))
    if problems:
        raise ConfigError(problems, source)


def _placed(needed: list[tuple[str, float, int]], node_gpus: list[float]) -> bool:
    """Whether every worker of `needed` ((names, GPUs each, workers)) finds a node with
    room, the largest first (first-fit decreasing: the scheduler's packing is no better)."""
    free = sorted(node_gpus, reverse=True)
    for gpus in sorted((g for _, g, n in needed for _ in range(n)), reverse=True):
        node = next((i for i, room in enumerate(free) if room + _EPS >= gpus), None)
        if node is None:
            return False
        free[node] -= gpus
    return True


def plan_pools(pools: list[list[Stage]], cluster_cpus: float, cluster_gpus: float,
               rows: int) -> list[PoolSize]:
    """The size of each pool of the stream (pools[0] decodes; the others run models), for
    `rows` inputs (before any fan-out). GPU pools first, as the module says; CPU model
    pools get one worker (it uses its CPUs for threads) or their concurrency; decoding
    gets the CPUs left."""
    sizes: list[PoolSize | None] = [None] * len(pools)
    per_worker = [_per_worker(pool) for pool in pools]
    names = [tuple(s.name for s in pool) for pool in pools]
    gpu_pools = [i for i in range(1, len(pools)) if per_worker[i][2]]
    fixed = sum(per_worker[i][2] * per_worker[i][3] for i in gpu_pools if per_worker[i][3])
    auto = [i for i in gpu_pools if not per_worker[i][3]]
    left = max(cluster_gpus - fixed, 0.0)
    for i in gpu_pools:
        batch, cpus, gpus, concurrency = per_worker[i]
        if concurrency:
            sizes[i] = PoolSize(names[i], batch, cpus, gpus, concurrency, concurrency,
                                concurrency)
            continue
        fanned = any(isinstance(s, FanOut) for pool in pools[:i] for s in pool)
        batches = math.inf if fanned else max(1, math.ceil(rows / batch))  # clips: unknown
        others = sum(per_worker[j][2] for j in auto if j != i)
        top = max(1, int(min(batches, (left - others) / gpus + _EPS)))
        start = max(1, min(top, int(left / len(auto) / gpus + _EPS)))
        sizes[i] = PoolSize(names[i], batch, cpus, gpus, start, 1, top)
    free = cluster_cpus
    for i in range(len(pools) - 1, 0, -1):
        batch, cpus, gpus, concurrency = per_worker[i]
        if sizes[i] is None:  # a model on CPU: one worker, using its CPUs for threads
            workers = concurrency or 1
            sizes[i] = PoolSize(names[i], batch, cpus, 0.0, workers, workers, workers)
        free -= sizes[i].cpus * sizes[i].workers
    batch, cpus, _, concurrency = per_worker[0]
    workers = concurrency or max(1, int(max(free, cpus) // cpus))
    sizes[0] = PoolSize(names[0], batch, cpus, 0.0, workers, workers, workers)
    return sizes  # type: ignore[return-value]


class WorkerSpans:
    """When each worker of a pool was at work: from the start of its first batch to the end
    of its last, folded from the tags its rows carry (`host:pid@start-end/peak`, wall-clock
    seconds of one batch and the worker's peak memory in KiB: curate.engine.workers);
    three numbers a worker, however long the run."""

    def __init__(self) -> None:
        self.spans: dict[str, tuple[float, float]] = {}
        self.peak_kb: dict[str, int] = {}

    def add(self, tags: list[str]) -> None:
        for tag in tags:
            worker, _, span = tag.rpartition("@")
            span, _, peak = span.partition("/")
            if peak:
                self.peak_kb[worker] = max(self.peak_kb.get(worker, 0), int(peak))
            start, end = (float(t) for t in span.split("-"))
            old = self.spans.get(worker)
            self.spans[worker] = (min(old[0], start), max(old[1], end)) if old else (start,
                                                                                     end)

    def peak(self) -> int:
        """The most workers at work at once (a worker that starts as another ends counts
        with it)."""
        events = sorted([(a, 0) for a, _ in self.spans.values()]
                        + [(b, 1) for _, b in self.spans.values()])
        peak = now = 0
        for _, ends in events:
            now += -1 if ends else 1
            peak = max(peak, now)
        return peak


def pool_record(size: PoolSize, wall_s: float, seconds_before: dict, seconds: dict,
                computed_before: dict, computed: dict, spans: WorkerSpans) -> dict:
    """What the run records of a pool: its plan, how many workers made rows (those the
    autoscaler added too) and the most of them at work at once, the seconds its workers
    were busy (the stages' own timings), how many workers were busy on average over the
    stream (an idle GPU shows as far fewer than its workers), the rows it took per second
    and the most memory one of its workers held (MB)."""
    busy = sum(seconds[n] - seconds_before.get(n, 0.0) for n in size.stages)
    rows = computed[size.stages[0]] - computed_before.get(size.stages[0], 0)
    wall = max(wall_s, 1e-9)
    return size.record() | {"workers_used": len(spans.spans), "peak_workers": spans.peak(),
                            "worker_peak_mb": round(max(spans.peak_kb.values()) / 1024, 1)
                            if spans.peak_kb else None,
                            "busy_s": round(busy, 3), "busy_workers": round(busy / wall, 3),
                            "rows": rows, "rows_per_s": round(rows / wall, 2)}
