"""The row stream of a run without Ray (the inline backend, curate.engine.backend).

Starting a local Ray (its GCS, raylet and worker processes) and Ray Data's actor pools costs
seconds that a small run never wins back, so `run.executor: auto` runs a small run with no
cluster in this process. Nothing else changes: the row stages run in the same
`SegmentWorker`s and rows are written as Lance fragments that the driver commits in
increments. The decoding segment runs on threads, one per CPU, each with its own copy of
the stages; each model segment, loaded once, runs in the calling thread on batches of its
own size while the threads decode the next blocks. Decoding (PIL, simplejpeg, PyAV,
hashlib), NumPy and torch release the GIL for the heavy parts.
"""

from __future__ import annotations

import collections
import copy
import os
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa

from curate.engine.backend import cpus
from curate.engine.workers import FanOutWorker, SegmentWorker, worker_options
from curate.plan import segments
from curate.stage import FanOut, Stage


def stream_fragments(parts: list[pa.Table], counts: list[int], stages: list[Stage],
                     row_stages_hash: str, stamps: dict[str, str], writer, write_rows: int,
                     num_cpus: int | None = None) -> Iterator[pa.Table]:
    """`curate.engine.ray_stream.stream_fragments` in this process: the decoding segment on threads,
    each model segment here in the calling thread on batches of its own size (as a Ray
    Data pool gets them: a model pads a short batch to its size), and the rows written as
    fragments of `write_rows` rows; yields each fragment's metadata."""
    pools = segments(stages)
    n = cpus(num_cpus)
    if len(pools) > 1:
        # A model's OpenMP threads spin while they wait for each other; next to the
        # decoding threads on the same cores that spinning starves them (a model on CPU
        # ran at less than half its speed). Read when torch loads, so set before that.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    block_rows = max(pools[0][0].resources.batch_size, 1)
    options = worker_options(pools, stages, row_stages_hash, stamps, None)
    local = threading.local()

    def make(i: int, pool: list[Stage], threads: int | None):
        kind = FanOutWorker if any(isinstance(s, FanOut) for s in pool) else SegmentWorker
        # a copy of the stages, as each Ray worker gets its own
        return kind(stages=copy.deepcopy(pool), threads=threads, **options[i])

    models = [make(i, pool, n) for i, pool in enumerate(pools) if i]

    def decode(block: pa.Table) -> list[pa.Table]:
        if not hasattr(local, "first"):
            local.first = make(0, pools[0], None)
        return _outputs(local.first, block)

    def cut() -> Iterator[pa.Table]:
        for part, count in zip(parts, counts):
            for start in range(0, count, block_rows):
                yield part.slice(start, block_rows)

    threads = ThreadPoolExecutor(max_workers=n, thread_name_prefix="curate-stream")
    waiting: collections.deque[Future] = collections.deque()

    def decoded() -> Iterator[pa.Table]:
        for block in cut():  # a bounded window ahead: memory stays a few blocks
            waiting.append(threads.submit(decode, block))
            if len(waiting) >= 2 * n:
                yield from waiting.popleft().result()
        while waiting:
            yield from waiting.popleft().result()

    rows: Iterator[pa.Table] = decoded()
    for model, pool in zip(models, pools[1:]):
        rows = _through(model, _rebatch(rows, min(s.resources.batch_size for s in pool)))
    try:
        for batch in _rebatch(rows, write_rows):
            yield writer(batch)
    finally:
        for future in waiting:
            future.cancel()
        threads.shutdown(wait=True, cancel_futures=True)


def _through(worker, batches: Iterator[pa.Table]) -> Iterator[pa.Table]:
    for batch in batches:
        yield from _outputs(worker, batch)


def _outputs(worker, table: pa.Table) -> list[pa.Table]:
    """A segment worker's output tables for one batch (a fan-out worker yields several)."""
    out = worker(table)
    return [out] if isinstance(out, pa.Table) else list(out)


def _rebatch(tables: Iterator[pa.Table], size: int) -> Iterator[pa.Table]:
    """The rows of `tables`, in order, in tables of `size` rows (the last one shorter)."""
    buffer: list[pa.Table] = []
    buffered = 0
    for table in tables:
        if not table.num_rows:
            continue
        buffer.append(table)
        buffered += table.num_rows
        if buffered < size:
            continue
        whole = pa.concat_tables(buffer, promote_options="default")
        start = 0
        while whole.num_rows - start >= size:
            yield whole.slice(start, size)
            start += size
        buffer = [whole.slice(start)] if start < whole.num_rows else []
        buffered = whole.num_rows - start
    if buffer:
        yield pa.concat_tables(buffer, promote_options="default")
