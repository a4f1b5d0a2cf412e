"""Batches that kill their workers.

A pool worker that dies (a decoder crashing on a file, a model running out of memory on
an image) is replaced by Ray and its batch is tried again, `WORKER_RETRIES` times. A batch
that kills its worker on every try would otherwise stop the run for good, and the next
run as well. Each worker therefore tells a small registry actor which batch it starts and
when it is done; a batch started more than once and never done is what killed them. The
run then fails naming the pool's stages and the batch's inputs, records them as set
aside, and the next run writes each of them as a row with a `worker_died` error instead
of reading it again: bad input becomes a row, and the rerun finishes the job.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyarrow as pa

#: Tries of a batch after a worker died on it (Ray's max_task_retries); then the run stops.
WORKER_RETRIES = 3
#: Inputs named in an error message at most.
NAMED = 5


class InflightRegistry:
    """Ray actor: the batches the pools' workers are on."""

    def __init__(self):
        self.open: dict[str, dict[str, Any]] = {}

    def start(self, key: str, stages: list[str], inputs: list[tuple[str, str]]) -> None:
        entry = self.open.setdefault(key, {"stages": stages, "inputs": inputs, "tries": 0})
        entry["tries"] += 1

    def done(self, key: str) -> None:
        self.open.pop(key, None)

    def suspects(self) -> list[dict[str, Any]]:
        """Batches that were started more than once and never finished."""
        return [entry for entry in self.open.values() if entry["tries"] > 1]


def registry():
    """A fresh registry for one run (an actor that ends with the driver)."""
    import ray

    return ray.remote(num_cpus=0)(InflightRegistry).remote()


def batch_key(pool: str, batch: pa.Table) -> str:
    ids = batch["input_id"].to_pylist() if "input_id" in batch.column_names else []
    ids += batch["sample_id"].to_pylist() if "sample_id" in batch.column_names else []
    return hashlib.sha256(repr((pool, ids)).encode()).hexdigest()[:24]


def batch_inputs(batch: pa.Table) -> list[tuple[str, str]]:
    """(input_id, uri) of each input the batch holds, once each."""
    if "input_id" not in batch.column_names:
        return []
    uris = batch["uri"].to_pylist() if "uri" in batch.column_names else [""] * batch.num_rows
    return list(dict.fromkeys(zip(batch["input_id"].to_pylist(), uris)))


def set_aside_reason(entry: dict[str, Any], run_id: str) -> str:
    count = len(entry["inputs"])
    others = f" (or one of the {count - 1} others in its batch)" if count > 1 else ""
    return (f"worker_died: the worker of {' + '.join(entry['stages'])} died on every try of "
            f"this input{others} in run {run_id}; it is not read again")


def mark_set_aside(part: pa.Table, reasons: dict[str, str]) -> pa.Table:
    """A listing part with the set-aside inputs' `_error` set: they become error rows."""
    if not reasons or part.num_rows == 0:
        return part
    ids = part["input_id"].to_pylist()
    errors = [reasons.get(i, e) for i, e in zip(ids, part["_error"].to_pylist())]
    return part.set_column(part.column_names.index("_error"), "_error",
                           pa.array(errors, pa.string()))
