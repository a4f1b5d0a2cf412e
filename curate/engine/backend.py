"""Where a run's work runs, decided once and handed down.

`wants_ray` decides at the start of a run (curate.engine.run, which makes the backend once
it holds the table's lease, and moves to Ray once when the listing finds many inputs) or
of an export (through `choose`): `RayBackend` (tasks and actor pools on a Ray cluster, or
on a local Ray it starts) or `InlineBackend` (the same task functions called in this
process, for a small run with no cluster). Everything that runs table-wide work takes the
backend as an argument: the global stages' executor, the input listing, the table's
writers and the exporter; the run picks the row stream that goes with it
(curate.engine.ray_stream or curate.engine.local_stream).

The interface is four calls, the part of Ray's task API that curate uses:

    task = backend.task(fn, num_returns=1, **scheduling)   # task.remote(*args) -> ref(s)
    values = backend.gather(refs)                           # refs -> values, here
    ref = backend.put(value)                                # a value other tasks read
    for i, value in backend.as_completed(refs): ...         # values as they finish

Inline, a "reference" is the value itself, so code written against the interface runs
the same either way.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator
from typing import Any


def cpus(num_cpus: int | None = None) -> int:
    """CPUs this process may use (`num_cpus` when set)."""
    if num_cpus:
        return num_cpus
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class InlineTask:
    """What `ray.remote(fn)` is to Ray, called at once: `.remote(*args)` gives fn's value
    (a tuple of `num_returns` values where Ray would give that many references)."""

    def __init__(self, fn: Callable, num_returns: int = 1):
        self.fn = fn
        self.num_returns = num_returns

    def options(self, num_returns: int = 1, **_scheduling) -> InlineTask:
        return InlineTask(self.fn, num_returns)

    def remote(self, *args):
        out = self.fn(*args)
        if self.num_returns > 1 and len(out) != self.num_returns:
            raise ValueError(f"{self.fn.__name__} gave {len(out)} values, not "
                             f"{self.num_returns}")
        return out


class Backend:
    """The four calls above; see the subclasses."""

    #: "ray" or "local": what run summaries and export records say.
    name: str = ""

    def task(self, fn: Callable, **options) -> Any:
        raise NotImplementedError

    def gather(self, refs: list) -> list:
        raise NotImplementedError

    def put(self, value: Any) -> Any:
        raise NotImplementedError

    def as_completed(self, refs: list) -> Iterator[tuple[int, Any]]:
        """(index in `refs`, value) of each task as it finishes."""
        raise NotImplementedError

    def partitions(self) -> int:
        """How many partitions a shuffle makes: about two per CPU, one inline."""
        raise NotImplementedError

    def slots(self, cpus: float, gpus: float = 0.0) -> int:
        """How many tasks asking for `cpus` and `gpus` each run at once (one inline)."""
        return 1


class InlineBackend(Backend):
    """Every task called here, at once; one partition."""

    name = "local"

    def __init__(self, num_cpus: int | None = None):
        self.num_cpus = cpus(num_cpus)

    def task(self, fn: Callable, **options) -> InlineTask:
        return InlineTask(fn, options.get("num_returns", 1))

    def gather(self, refs: list) -> list:
        return list(refs)

    def put(self, value: Any) -> Any:
        return value

    def as_completed(self, refs: list) -> Iterator[tuple[int, Any]]:
        yield from enumerate(refs)

    def partitions(self) -> int:
        return 1


class RayBackend(Backend):
    """Tasks on the Ray cluster at `address` (default: `RAY_ADDRESS`, else a local Ray
    started here); joins it when made."""

    name = "ray"

    def __init__(self, address: str | None = None, num_cpus: int | None = None):
        connect(address, num_cpus)

    def task(self, fn: Callable, **options) -> Any:
        import ray

        return ray.remote(**options)(fn) if options else ray.remote(fn)

    def gather(self, refs: list) -> list:
        import ray

        return ray.get(list(refs))

    def put(self, value: Any) -> Any:
        import ray

        return ray.put(value)

    def as_completed(self, refs: list) -> Iterator[tuple[int, Any]]:
        import ray

        index_of = {ref: i for i, ref in enumerate(refs)}
        waiting = list(refs)
        while waiting:
            done, waiting = ray.wait(waiting, num_returns=1)
            for ref in done:
                yield index_of[ref], ray.get(ref)

    def partitions(self) -> int:
        import ray

        return max(2, int(ray.cluster_resources().get("CPU", 1)) * 2)

    def slots(self, cpus: float, gpus: float = 0.0) -> int:
        import ray

        have = ray.cluster_resources()
        fits = int(have.get("CPU", 1) // cpus) if cpus else 1
        if gpus:
            fits = min(fits, int(have.get("GPU", 0) // gpus))
        return max(1, fits)


def wants_ray(executor: str, address: str | None, large: bool = False) -> bool:
    """Where a run starts: on Ray when told so, when a cluster is given or already joined
    in this process, or when the work is `large` (a stage asks for GPUs, which Ray
    schedules; an export of many rows); else here (a run then moves to Ray after listing
    when its inputs are many: see curate.engine.run)."""
    if executor != "auto":
        return executor == "ray"
    if address or os.environ.get("RAY_ADDRESS"):
        return True
    ray = sys.modules.get("ray")  # not imported: no connection to reuse
    if ray is not None and ray.is_initialized():
        return True
    return large


def choose(executor: str, address: str | None = None, num_cpus: int | None = None,
           large: bool = False) -> Backend:
    """The backend of a run or an export (see `wants_ray`)."""
    if wants_ray(executor, address, large):
        return RayBackend(address, num_cpus)
    return InlineBackend(num_cpus)


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a Ray cluster (`address`) or start a local one; reuse a connection in place."""
    import ray

    # Ray starts its processes with fork+exec; lance warns about fork in general, but exec
    # replaces the child at once, so the warning says nothing about this use.
    warnings.filterwarnings("ignore", message=".*fork.*", category=RuntimeWarning)
    warnings.filterwarnings("ignore", message="lance is not fork-safe", category=UserWarning)
    if not ray.is_initialized():
        # RAY_ADDRESS is set for us inside a Ray job; CURATE_RAY_ADDRESS by `curate serve`
        # for the runs it starts (the cluster to join if the run goes to Ray at all)
        address = address or os.environ.get("RAY_ADDRESS") or os.environ.get(
            "CURATE_RAY_ADDRESS")
        from curate import logs

        # under `curate run` without -v, workers' own prints stay in Ray's logs
        relay = not logs.QUIET
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=relay)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, logging_level=logging.WARNING,
                     log_to_driver=relay)
        from curate import stopping

        stopping.reclaim()  # ray.init installed its own SIGTERM handlers
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)
