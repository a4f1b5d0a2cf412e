"""Values computed outside runs (on-demand features of the serving layer), kept by
sample_id in a side table `<table>_features` and merged into the samples table only under
its run lease (curate.table.lease), so nothing writes the samples table beside a run."""

from __future__ import annotations

import logging
import secrets

import pyarrow as pa

from curate.filters import ids_in
from curate.table.lease import CACHE_RUN, RunLease
from curate.table.store import NULL_VECTORS

log = logging.getLogger(__name__)

#: Column of `<table>_features` marking values of rows of the table not yet merged there.
FOR_TABLE = "for_table"

#: Kept values merged into the table per step, all steps under one hold of the lease: the
#: feature service holds one step's rows at a time, never the whole side table.
MERGE_BATCH = 1000


class FeatureCache:
    """Features computed on demand, kept by sample_id.

    Values of images outside the table (uploads, URLs) go to `<table>_features`, which no
    run writes. A value of a row of the table goes into that row, but only under the run
    lease, held for that one merge and taken only when no one holds it: a write beside a
    run's commits could make them conflict (failing a run that may have worked for hours)
    or be lost under the run's rewrite of the row. While a run holds the lease, the request
    neither waits for it nor fails: the value is answered, kept in `<table>_features` with
    `for_table` set (served from there meanwhile) and merged into the row under the lease
    once the run has ended: by the next value cached, or by `flush`, which the feature
    service calls every `RETRY_S`. A value the run has since set in the row wins; a row the
    run removed takes none.
    """

    def __init__(self, store, types: dict[str, pa.DataType]):
        self.store = store
        self.types = types
        self.side_name = f"{store.name}_features"

    def side(self):
        return self.store.open_table(self.side_name)

    def side_values(self, sample_id: str, wanted: list[str]) -> dict:
        """The values kept in `<table>_features` for `sample_id` (of `wanted`, not null)."""
        side = self.side()
        if side is None:
            return {}
        present = [c for c in wanted if c in side.schema.names]
        rows = side.to_lance().to_table(columns=present, filter=ids_in([sample_id]))
        return {k: v for k, v in rows.to_pylist()[0].items() if v is not None} \
            if rows.num_rows else {}

    def put(self, row: pa.Table, uri: str, known: bool) -> str:
        """Keep one row of computed values (sample_id and feature columns). Returns where
        they went: "table", "pending" (kept beside it while a run holds the lease) or
        "side_table" (an image outside the table)."""
        if known and self._merge(row):
            return "table"
        flag = pa.array([known], pa.bool_())
        self._side_put(row.append_column("uri", pa.array([uri], pa.string()))
                       .append_column(FOR_TABLE, flag))
        return "pending" if known else "side_table"

    def pending(self, limit: int | None = None) -> pa.Table | None:
        """Up to `limit` (default MERGE_BATCH) values of rows of the table waiting for the
        lease (None: none)."""
        side = self.side()
        if side is None or FOR_TABLE not in side.schema.names:
            return None
        rows = side.to_lance().to_table(filter=f"{FOR_TABLE} = true",
                                        limit=limit or MERGE_BATCH)
        return rows.drop_columns(["uri", FOR_TABLE]) if rows.num_rows else None

    def flush(self) -> bool:
        """Merge the pending values into the table under the lease; False while someone
        holds it (they stay pending)."""
        return self.pending(limit=1) is None or self._merge(None)

    # --- writes ---------------------------------------------------------------------------
    def _side_put(self, row: pa.Table) -> None:
        side = self.side()
        if side is None:
            self.store.db.create_table(self.side_name, row, on_bad_vectors=NULL_VECTORS)
            return
        missing = [f for f in row.schema if f.name not in side.schema.names]
        if missing:
            side.add_columns(pa.schema(missing))
        (side.merge_insert("sample_id").when_matched_update_all()
         .when_not_matched_insert_all().execute(row, on_bad_vectors=NULL_VECTORS))

    def _merge(self, row: pa.Table | None) -> bool:
        """Under a short hold of the run lease, merge `row` and the pending values into
        the table and drop those from `<table>_features`; False when the lease is held."""
        lease = RunLease(self.store, CACHE_RUN + secrets.token_hex(4))
        if not lease.try_acquire():
            return False
        try:
            while True:  # a step of at most MERGE_BATCH kept values (and `row`) at a time
                pending = self.pending()
                parts = [t for t in (pending, row) if t is not None]
                if not parts:
                    break
                if not lease.held():  # taken over since (a hold that lasted too long)
                    return False
                self._into_table(pa.concat_tables(parts, promote_options="permissive"))
                row = None
                if pending is None:
                    break
                self.side().delete(f"{FOR_TABLE} = true AND "
                                   + ids_in(pending["sample_id"].to_pylist()))
                log.info("features of %d rows, kept while a run held the lease, are in "
                         "table %s now", pending.num_rows, self.store.name)
                if pending.num_rows < MERGE_BATCH:
                    break
        finally:
            lease.release()
        return True

    def _into_table(self, rows: pa.Table) -> None:
        """Set the values of `rows` on the table's rows that have none (later rows of one
        sample_id win over earlier ones)."""
        values: dict[str, dict] = {}
        for row in rows.to_pylist():
            sample_id = row.pop("sample_id")
            values.setdefault(sample_id, {}).update(
                {k: v for k, v in row.items() if v is not None})
        columns = sorted({c for v in values.values() for c in v})
        if not columns:
            return
        dataset = self.store.dataset()
        have = [c for c in columns if c in dataset.schema.names]
        merged = {}
        for current in dataset.to_table(columns=["sample_id", *have],
                                        filter=ids_in(list(values))).to_pylist():
            new = values[current["sample_id"]]
            merged[current["sample_id"]] = {
                "sample_id": current["sample_id"],
                **{c: current[c] if current.get(c) is not None else new.get(c)
                   for c in columns}}
        if not merged:  # the rows are gone (a run removed them): nothing to fill
            return
        schema = pa.schema([("sample_id", pa.string())]
                           + [(c, self.types.get(c, rows.schema.field(c).type))
                              for c in columns])
        self.store.ensure_table(schema)
        (self.store.table().merge_insert("sample_id").when_matched_update_all()
         .execute(pa.Table.from_pylist(list(merged.values()), schema=schema),
                  on_bad_vectors=NULL_VECTORS))


