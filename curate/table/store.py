"""The LanceDB table that holds every sample, and the table of runs beside it.

A run reads and writes both tables with Lance itself (each is a Lance dataset at
`<database>/<table>.lance`); LanceDB, whose import alone costs a second and a half of every
command's start-up, is loaded only for what needs it (vector search, the API's tables)."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pyarrow as pa

from curate.config import StoreConfig
from curate.errors import DISK_FULL, NO_WRITE, RunError, says, storage_message
from curate.reviews import REVIEWS_SCHEMA
from curate.table.layout import RUN_SCHEMA, resolve_uri, run_row, table_path

#: A row with no embedding (its image failed) has a null vector; LanceDB counts null
#: vectors as bad and would refuse the write unless told to keep them null.
NULL_VECTORS = "null"
#: Versions older than this are removed when a run optimizes the table (LanceDB's
#: default); tagged versions are kept.
KEEP_VERSIONS = timedelta(days=7)


def _make_folder(path: str) -> None:
    """A local store's folder, made if missing (as LanceDB's connect made it: runs that
    start together must not race to create it), or a clear error naming what is in the
    way."""
    import os
    from pathlib import Path

    for folder in (Path(path), *Path(path).parents):
        if folder.exists():
            if not folder.is_dir():
                raise RunError(f"cannot open the store at {path}: {folder} is a file, not a "
                               "directory. Point store.uri at a directory.")
            break
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise RunError(f"cannot open the store at {path}: {storage_message(exc)}") from None


class Store:
    """One LanceDB database: the samples table (`store.table`) and `<table>_runs`."""

    def __init__(self, config: StoreConfig, read_consistency_s: float | None = None):
        """`read_consistency_s`: how stale a read may be when other processes write (None:
        the version seen at open; readers that stay open, like a server, set it)."""
        self.config = config
        self.uri = resolve_uri(config.uri)
        self.name = config.table
        self.runs_name = f"{config.table}_runs"
        self.read_consistency_s = read_consistency_s
        #: Called before each commit (the run's lease check); None outside runs.
        self.before_commit: Callable[[], None] | None = None
        self._db = None
        if "://" not in self.uri:
            _make_folder(self.uri)

    @property
    def db(self):
        """The LanceDB connection (made on first use)."""
        if self._db is None:
            import lancedb

            try:
                self._db = lancedb.connect(
                    self.uri, storage_options=self.storage_options,
                    read_consistency_interval=(
                        None if self.read_consistency_s is None
                        else timedelta(seconds=self.read_consistency_s)),
                )
            except Exception as exc:  # LanceDB raises many kinds; all mean the same here
                raise RunError(f"cannot open the store at {self.uri}: "
                               f"{storage_message(exc)}") from None
        return self._db

    # --- samples ------------------------------------------------------------------------
    def _lance(self, name: str, version: int | str | None = None):
        """The Lance dataset of table `name`, or None when there is none."""
        import lance

        try:
            return lance.dataset(table_path(self.uri, name), version=version,
                                 storage_options=self.storage_options)
        except (ValueError, FileNotFoundError):
            return None
        except OSError as exc:
            if "not found" in str(exc).lower() or "no such file" in str(exc).lower():
                return None
            raise RunError(f"cannot open the store at {self.uri}: "
                           f"{storage_message(exc)}") from None

    def _create(self, name: str, schema: pa.Schema):
        import lance

        try:
            return lance.write_dataset(schema.empty_table(), table_path(self.uri, name),
                                       mode="create", storage_options=self.storage_options)
        except (OSError, RuntimeError, ValueError) as exc:
            raise self.write_error(exc) from None

    def open_table(self, name: str):
        """Table `name` of the database as a LanceDB table, or None when there is none."""
        if self._lance(name) is None:
            return None
        return self.db.open_table(name)

    def table(self):
        """The samples table as a LanceDB table, or None before the first run."""
        return self.open_table(self.name)

    def ensure_table(self, schema: pa.Schema):
        """Create the samples table, or add the columns it lacks; refuse type conflicts.
        Returns its Lance dataset."""
        dataset = self._lance(self.name)
        if dataset is None:
            return self._create(self.name, schema)
        have = dataset.schema
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
            dataset.add_columns({"input_id": "sample_id"})
            missing = [f for f in missing if f.name != "input_id"]
        if missing:
            dataset.add_columns(pa.schema(missing))
        return self._lance(self.name)

    def read(self, columns: list[str] | None = None, filter: str | None = None) -> pa.Table:
        """Columns of every row matching `filter` (as of the latest version), in this
        process: for tests and small tables, never on a run's path."""
        dataset = self._lance(self.name)
        if dataset is None:
            return pa.table({})
        return dataset.to_table(columns=columns, filter=filter)

    # --- the table as a Lance dataset: workers write fragments, the driver commits -------
    @property
    def storage_options(self) -> dict | None:
        return self.config.storage_options or None

    @property
    def uri_of_table(self) -> str:
        """Where the samples table's Lance dataset lives (workers open it there)."""
        return table_path(self.uri, self.name)

    def dataset(self):
        """The samples table's Lance dataset at its latest version (None before the first
        run)."""
        return self._lance(self.name)

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

    def commit_compaction(self, dataset, results: list[str]) -> None:
        """One commit of the fragments that compaction tasks rewrote (their results, see
        curate.table.fragments.run_compaction), under the same lease check as every
        commit."""
        from lance.optimize import Compaction, RewriteResult

        if self.before_commit is not None:
            self.before_commit()
        try:
            Compaction.commit(dataset, [RewriteResult.from_json(r) for r in results])
        except (OSError, RuntimeError, ValueError) as exc:
            raise self.write_error(exc) from None

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

    def version(self) -> int:
        dataset = self._lance(self.name)
        return int(dataset.version) if dataset is not None else 0

    def count_rows(self) -> int:
        dataset = self._lance(self.name)
        return dataset.count_rows() if dataset is not None else 0

    def schema(self) -> pa.Schema | None:
        dataset = self._lance(self.name)
        return dataset.schema if dataset is not None else None

    def tag(self, name: str, version: int) -> None:
        self._lance(self.name).tags.create(name, version)

    def optimize(self) -> None:
        """Bring the indexes up to date and remove versions older than a week that no tag
        holds (what LanceDB's optimize does after compaction, which runs in tasks first:
        curate.engine.tasks.compact)."""
        dataset = self._lance(self.name)
        if dataset.describe_indices():
            dataset.optimize.optimize_indices()
        dataset.cleanup_old_versions(older_than=KEEP_VERSIONS)

    def ensure_indexes(self, columns) -> list[str]:
        """A BTREE index on each of `columns` the table has and no index covers yet;
        returns the columns indexed now. Rows added later are scanned until an optimize
        (`optimize`) brings the indexes up to date: filters stay exact."""
        dataset = self._lance(self.name)
        have = {c for ix in dataset.describe_indices() for c in ix.field_names}
        made = []
        for column in columns:
            if column not in have and column in dataset.schema.names:
                dataset.create_scalar_index(column, "BTREE")
                dataset = self._lance(self.name)
                made.append(column)
        return made

    def ensure_vector_index(self, column: str, min_rows: int) -> str:
        """Build the ANN index once enough rows have vectors; bring it up to date with rows
        added since. Returns what was done (for logs). Search is exact on rows that are not
        indexed yet, so results never miss new rows; the index only makes them faster."""
        from lancedb.index import HnswSq

        table = self.table()  # fresh: the index is built on the latest version
        if column not in table.schema.names:
            return "no vector column"
        index = next((ix for ix in table.list_indices() if column in (ix.columns or [])), None)
        if index is None:
            with_vectors = table.count_rows(f"{column} IS NOT NULL")
            if with_vectors < min_rows:
                return f"exact search ({with_vectors} vectors < index_min_rows {min_rows})"
            partitions = max(1, int(math.sqrt(with_vectors) / 4))
            table.create_index(column, config=HnswSq(distance_type="cosine",
                                                     num_partitions=partitions))
            return f"index built over {with_vectors} vectors"
        stats = table.index_stats(index.name)
        if stats is not None and stats.num_unindexed_rows:
            table.optimize()  # indexes the new rows incrementally
            return f"index updated with {stats.num_unindexed_rows} new rows"
        return "index up to date"

    # --- reviews (curate.reviews) ---------------------------------------------------------
    @property
    def reviews_name(self) -> str:
        return f"{self.name}_reviews"

    def ensure_reviews(self):
        """The reviews table's Lance dataset, created here when missing. A run creates it
        under its lease (with the samples table); one made by an older release gets it at
        its first review."""
        dataset = self._lance(self.reviews_name)  # (an empty dataset is falsy)
        if dataset is not None:
            return dataset
        try:
            return self._create(self.reviews_name, REVIEWS_SCHEMA)
        except RunError:  # made a moment ago by another writer (a replica, a run)
            dataset = self._lance(self.reviews_name)
            if dataset is None:
                raise
            return dataset

    def add_reviews(self, given: pa.Table) -> int:
        """Append verdicts (curate.reviews.entries); returns the reviews table's version.
        Appends commit atomically and never conflict with one another or with a run."""
        import lance

        self.ensure_reviews()
        try:
            dataset = lance.write_dataset(given, table_path(self.uri, self.reviews_name),
                                          mode="append", storage_options=self.storage_options)
        except (OSError, RuntimeError, ValueError) as exc:
            raise self.write_error(exc) from None
        return dataset.version

    def reviews(self, version: int | None = None, filter: str | None = None) -> pa.Table:
        """Every verdict given (matching `filter`), in commit order, at `version` of the
        reviews table."""
        dataset = self._lance(self.reviews_name, version)
        if dataset is None:
            return REVIEWS_SCHEMA.empty_table()
        return dataset.to_table(columns=REVIEWS_SCHEMA.names, filter=filter)

    def tidy_reviews(self, applied: int) -> int:
        """The reviews table's many small appends (one per request) compacted, and a
        BTREE index on sample_id brought up to date: the serve app's lookups of verdicts
        by id (badges, undo, the audit's estimate) stay index lookups. Appends made
        meanwhile commit beside it. Returns the version that holds the verdicts of version
        `applied` (0: none) after this: the tidied one, unless someone appended since
        (the table only grows, so the same row count means the same verdicts)."""
        dataset = self._lance(self.reviews_name)
        seen = self._lance(self.reviews_name, applied) if applied and dataset else None
        if seen is None:
            return applied
        rows = seen.count_rows()
        try:
            if len(dataset.get_fragments()) > 1:
                dataset.optimize.compact_files()
            if any("sample_id" in ix.field_names for ix in dataset.describe_indices()):
                dataset.optimize.optimize_indices()
            else:
                dataset.create_scalar_index("sample_id", "BTREE")
        except (OSError, RuntimeError, ValueError):  # a conflict: the next run does it
            pass
        dataset = self._lance(self.reviews_name)
        return dataset.version if dataset.count_rows() == rows else applied

    def reviews_version(self) -> int:
        """The reviews table's version (0 before the first)."""
        dataset = self._lance(self.reviews_name)
        return 0 if dataset is None else dataset.version

    # --- runs ---------------------------------------------------------------------------
    def runs_table(self):
        """The runs table's Lance dataset, created (or given the columns it lacks) here."""
        dataset = self._lance(self.runs_name)
        if dataset is None:
            return self._create(self.runs_name, RUN_SCHEMA)
        missing = [f for f in RUN_SCHEMA if f.name not in dataset.schema.names]
        if missing:  # a table written by an older curate
            dataset.add_columns(pa.schema(missing))
            dataset = self._lance(self.runs_name)
        return dataset

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
        dataset = self._lance(self.runs_name)
        if dataset is None:
            return []
        # one row per run or export: metadata, never the samples. Runs tables of older
        # releases have no `kind`: every row in them is a run.
        if "kind" in dataset.schema.names:
            where = f"kind = '{kind}'" + (" OR kind IS NULL" if kind == "run" else "")
        else:
            where = None if kind == "run" else "false"
        return sorted(dataset.to_table(filter=where).to_pylist(),
                      key=lambda r: r["started_at"])
