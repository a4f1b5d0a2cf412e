"""The LanceDB table that holds every sample, and the table of runs beside it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import lancedb
import pyarrow as pa

from curate.config import StoreConfig
from curate.errors import DISK_FULL, NO_WRITE, RunError, says, storage_message
from curate.tables import RUN_SCHEMA, resolve_uri, run_row

#: A row with no embedding (its image failed) has a null vector; LanceDB counts null
#: vectors as bad and would refuse the write unless told to keep them null.
NULL_VECTORS = "null"


class Store:
    """One LanceDB database: the samples table (`store.table`) and `<table>_runs`."""

    def __init__(self, config: StoreConfig, read_consistency_s: float | None = None):
        """`read_consistency_s`: how stale a read may be when other processes write (None:
        the version seen at open; readers that stay open, like a server, set it)."""
        self.config = config
        self.uri = resolve_uri(config.uri)
        self.name = config.table
        self.runs_name = f"{config.table}_runs"
        #: Called before each commit (the run's lease check); None outside runs.
        self.before_commit: Callable[[], None] | None = None
        try:
            self.db = lancedb.connect(
                self.uri, storage_options=config.storage_options or None,
                read_consistency_interval=(
                    None if read_consistency_s is None else timedelta(seconds=read_consistency_s)
                ),
            )
        except Exception as exc:  # LanceDB raises many kinds; all mean the same here
            raise RunError(f"cannot open the store at {self.uri}: "
                           f"{storage_message(exc)}") from None

    # --- samples ------------------------------------------------------------------------
    def _open(self, name: str):
        try:
            return self.db.open_table(name)
        except ValueError:
            return None

    def table(self):
        """The samples table, or None before the first run."""
        return self._open(self.name)

    def ensure_table(self, schema: pa.Schema):
        """Create the samples table, or add the columns it lacks; refuse type conflicts."""
        table = self.table()
        if table is None:
            return self.db.create_table(self.name, schema=schema)
        have = table.schema
        conflicts = [
            f"{f.name} is {have.field(f.name).type} in the table, the pipeline writes {f.type}"
            for f in schema
            if f.name in have.names and not have.field(f.name).type.equals(f.type)
        ]
        if conflicts:
            raise RunError(
                f"table {self.name} at {self.uri} does not fit this pipeline: "
                + "; ".join(conflicts) + ". Use another store.table or store.uri."
            )
        missing = [f for f in schema if f.name not in have.names]
        if "input_id" in (f.name for f in missing) and "sample_id" in have.names:
            # a table from before rows had input_id: each row was its own input
            table.add_columns({"input_id": "sample_id"})
            missing = [f for f in missing if f.name != "input_id"]
        if missing:
            table.add_columns(pa.schema(missing))
        return table

    def read(self, columns: list[str] | None = None, filter: str | None = None) -> pa.Table:
        """Columns of every row (as of the latest version)."""
        table = self.table()
        if table is None:
            return pa.table({})
        return table.to_lance().to_table(columns=columns, filter=filter)

    # --- the table as a Lance dataset: workers write fragments, the driver commits -------
    @property
    def storage_options(self) -> dict | None:
        return self.config.storage_options or None

    @property
    def uri_of_table(self) -> str:
        """Where the samples table's Lance dataset lives (workers open it there)."""
        return self.table().to_lance().uri

    def dataset(self):
        """The samples table's Lance dataset at its latest version (None before the first
        run)."""
        import lance

        if self.table() is None:
            return None
        return lance.dataset(self.uri_of_table, storage_options=self.storage_options)

    def _commit(self, operation, read_version: int) -> int:
        import lance

        if self.before_commit is not None:
            self.before_commit()
        try:
            dataset = lance.LanceDataset.commit(self.uri_of_table, operation,
                                                read_version=read_version,
                                                storage_options=self.storage_options)
        except (OSError, RuntimeError, ValueError) as exc:
            raise self.write_error(exc) from None
        return int(dataset.version)

    def write_error(self, exc: BaseException) -> RunError:
        """What a failed write to the store means for the user, in one line."""
        detail = storage_message(exc)
        where = f"the table {self.name} at {self.uri}"
        if says(detail, DISK_FULL):
            return RunError(f"the disk holding {where} is full ({detail}). Free space there "
                            "and run the same command again: the table stays readable at "
                            "its last commit and the run resumes from it.")
        if "conflict" in detail.lower():
            return RunError(f"{where} was changed by another writer while this run "
                            f"committed ({detail}). Run the same command again: it goes on "
                            "from the last commit.")
        if says(detail, NO_WRITE):
            return RunError(f"cannot write to {where}: {detail}. Give this user write "
                            "access there, or point store.uri elsewhere.")
        return RunError(f"cannot write to {where}: {detail}")

    def commit_append(self, fragments: list[str]) -> int:
        """Commit fragments written by workers (FragmentMetadata as JSON) as new rows."""
        import lance
        from lance.fragment import FragmentMetadata

        metadata = [FragmentMetadata.from_json(f) for f in fragments]
        return self._commit(lance.LanceOperation.Append(metadata), self.version())

    def commit_update(self, fragments: list[str], fields: list[int], read_version: int) -> int:
        """Commit fragments whose columns workers rewrote."""
        import lance
        from lance.fragment import FragmentMetadata

        metadata = [FragmentMetadata.from_json(f) for f in fragments]
        return self._commit(lance.LanceOperation.Update(updated_fragments=metadata,
                                                        fields_modified=fields), read_version)

    def commit_delete(self, fragments: list[str], removed: list[int], why: str,
                      read_version: int) -> int:
        """Commit fragments with rows deleted by workers (and fragments deleted whole)."""
        import lance
        from lance.fragment import FragmentMetadata

        metadata = [FragmentMetadata.from_json(f) for f in fragments]
        return self._commit(lance.LanceOperation.Delete(updated_fragments=metadata,
                                                        deleted_fragment_ids=removed,
                                                        predicate=why), read_version)

    def merge_columns(self, columns: pa.Table) -> None:
        """Set the given columns on the rows with these sample_ids (others keep theirs)."""
        if columns.num_rows == 0:
            return
        (
            self.table()
            .merge_insert("sample_id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(columns, on_bad_vectors=NULL_VECTORS)
        )

    def version(self) -> int:
        table = self.table()
        return int(table.version) if table is not None else 0

    def tag(self, name: str, version: int) -> None:
        self.table().tags.create(name, version)

    def optimize(self) -> None:
        """Compact the many small fragments that incremental commits leave behind (in
        tasks on the cluster), then let LanceDB bring its indexes up to date."""
        from curate.tasks import compact

        compact(self)
        self.table().optimize()

    def ensure_sample_index(self) -> None:
        """Scalar indexes on sample_id and input_id keep lookups by id fast on large
        tables."""
        table = self.table()
        have = {c for ix in table.list_indices() for c in (ix.columns or [])}
        for column in ("sample_id", "input_id"):
            if column not in have and column in table.schema.names:
                table.create_scalar_index(column)

    # --- runs ---------------------------------------------------------------------------
    def runs_table(self):
        table = self._open(self.runs_name)
        if table is None:
            table = self.db.create_table(self.runs_name, schema=RUN_SCHEMA)
        missing = [f for f in RUN_SCHEMA if f.name not in table.schema.names]
        if missing:  # a table written by an older curate
            table.add_columns(pa.schema(missing))
        return table

    def save_run(self, record: dict[str, Any]) -> None:
        data = run_row(record)
        (
            self.runs_table()
            .merge_insert("run_id")
            .when_matched_update_all()
            .when_not_matched_insert_all()
            .execute(data)
        )

    def runs(self, kind: str = "run") -> list[dict[str, Any]]:
        """Every recorded run of the pipeline (`kind` run) or export (`kind` export),
        oldest first."""
        table = self._open(self.runs_name)
        if table is None:
            return []
        rows = [r for r in table.to_arrow().to_pylist() if (r.get("kind") or "run") == kind]
        return sorted(rows, key=lambda r: r["started_at"])
