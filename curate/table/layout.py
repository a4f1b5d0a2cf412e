"""Where a store's tables live, and the rows of its runs table: what the commands that
only read a table (export, the data loader) need, without importing LanceDB (a second
and a half of start-up); they open the tables with Lance itself."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa

RUN_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("kind", pa.string()),  # run (a pipeline's run; null in older tables) | export
        ("pipeline", pa.string()),
        ("status", pa.string()),  # running | finished | failed | interrupted
        ("config_hash", pa.string()),
        ("rows_hash", pa.string()),  # what made the rows and each stage's stamp
        ("config_yaml", pa.string()),
        ("started_at", pa.timestamp("us", tz="UTC")),
        ("finished_at", pa.timestamp("us", tz="UTC")),
        ("seconds", pa.float64()),
        ("version_before", pa.int64()),
        ("version_after", pa.int64()),
        ("tag", pa.string()),
        ("rows_total", pa.int64()),
        ("rows_processed", pa.int64()),
        ("stages_json", pa.string()),
        ("versions_json", pa.string()),
        ("models_json", pa.string()),
        ("notices_json", pa.string()),
        ("set_aside_json", pa.string()),  # input_id -> why, inputs not to read again
        ("stats_json", pa.string()),  # counts and histograms of the table it left (/stats)
        ("pools_json", pa.string()),  # the row stream's actor pools (curate.engine.pools)
        ("reviews_version", pa.int64()),  # the reviews whose verdicts it applied (0: none)
        ("error", pa.string()),
    ]
)


def resolve_uri(uri: str) -> str:
    """Local paths become absolute; object-store URIs pass through untouched."""
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def now() -> datetime:
    return datetime.now(timezone.utc)


def table_path(uri: str, table: str) -> str:
    """The Lance dataset of `table` in the LanceDB database at `uri` (LanceDB keeps each
    table as `<database>/<table>.lance`)."""
    return f"{resolve_uri(uri).rstrip('/')}/{table}.lance"


def run_row(record: dict[str, Any]) -> pa.Table:
    """One row of the runs table from a run's record (dicts and lists as JSON)."""
    row = {name: record.get(name) for name in RUN_SCHEMA.names}
    row["kind"] = row["kind"] or "run"
    for key in (name for name in RUN_SCHEMA.names if name.endswith("_json")):
        if row[key] is not None and not isinstance(row[key], str):
            row[key] = json.dumps(row[key])
    return pa.Table.from_pylist([row], schema=RUN_SCHEMA)
