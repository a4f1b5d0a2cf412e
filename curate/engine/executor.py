"""Where a run's global stages work: tasks of the run's backend over the table's fragments.
A global stage is written once against this small interface (`MemoryExecutor` in
curate.parts offers the same over one in-memory table, for unit tests and single calls):

    parts = ex.scan(columns, fn)          # the alive rows, in parts, each with `_rowaddr`
    parts = ex.map(parts, fn, *args)      # fn(part, *args) per part
    parts = ex.shuffle(parts, key, fn)    # rows with equal key meet in one fn(partition)
    values = ex.gather(parts)             # small results (counts, centroids) here
    ref = ex.task(fn, *args)              # one task (e.g. k-means on a sample)

and returns a `GlobalResult`: parts holding `_rowaddr` and its new columns. Arguments that
are references (`ex.put`, `ex.task`) are resolved before `fn` sees them.
"""

from __future__ import annotations

from collections.abc import Callable

from curate.engine import tasks
from curate.engine.backend import Backend
from curate.parts import GlobalResult, Part


class StoreExecutor:
    """The rows of `store` that match `alive_filter` (a Lance filter), in tasks of
    `backend`."""

    def __init__(self, backend: Backend, store, alive_filter: str | None):
        self.backend = backend
        self.store = store
        self.alive_filter = alive_filter

    def scan(self, columns: list[str], fn: Callable | None = None, *args) -> list[Part]:
        have = set(self.store.dataset().schema.names)
        return tasks.scan(self.backend, self.store, [c for c in columns if c in have],
                          self.alive_filter, fn, args)

    def map(self, parts: list[Part], fn: Callable, *args) -> list[Part]:
        return tasks.map_parts(self.backend, parts, fn, args)

    def shuffle(self, parts: list[Part], key, fn: Callable, *args) -> list[Part]:
        return tasks.shuffle(self.backend, parts, key, fn, args)

    def gather(self, parts: list[Part]) -> list:
        return self.backend.gather(parts)

    def task(self, fn: Callable, *args) -> Part:
        return tasks.run_task(self.backend, fn, *args)

    def put(self, value):
        return self.backend.put(value)

    def write(self, result: GlobalResult) -> int:
        """Commit the result's columns, one commit; returns the new table version."""
        if result.keep and not result.parts:
            return self.store.version()
        return tasks.write_columns(self.backend, self.store, result.parts, result.schema,
                                   result.defaults, keep=result.keep)
