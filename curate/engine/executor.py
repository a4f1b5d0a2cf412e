"""Where a global stage's work runs: in tasks on the cluster over the table's fragments
(`ClusterExecutor`), or in this process over one Arrow table (`MemoryExecutor`, for unit
tests and single calls). A global stage is written once against this small interface:

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

from curate.parts import GlobalResult, Part


class ClusterExecutor:
    """Tasks on the Ray cluster over the table's fragments; `alive` is a Lance filter."""

    def __init__(self, store, alive_filter: str | None):
        self.store = store
        self.alive_filter = alive_filter

    def scan(self, columns: list[str], fn: Callable | None = None, *args) -> list[Part]:
        from curate.engine.tasks import scan

        have = set(self.store.dataset().schema.names)
        return scan(self.store, [c for c in columns if c in have], self.alive_filter, fn, args)

    def map(self, parts: list[Part], fn: Callable, *args) -> list[Part]:
        from curate.engine.tasks import map_parts

        return map_parts(parts, fn, args)

    def shuffle(self, parts: list[Part], key, fn: Callable, *args) -> list[Part]:
        from curate.engine.tasks import shuffle

        return shuffle(parts, key, fn, args)

    def gather(self, parts: list[Part]) -> list:
        from curate.engine.tasks import gather

        return gather(parts)

    def task(self, fn: Callable, *args) -> Part:
        from curate.engine.tasks import run_task

        return run_task(fn, *args)

    def put(self, value):
        from curate.engine.tasks import put

        return put(value)

    def write(self, result: GlobalResult) -> int:
        """Commit the result's columns, one commit; returns the new table version."""
        from curate.engine.tasks import write_columns

        return write_columns(self.store, result.parts, result.schema, result.defaults)


