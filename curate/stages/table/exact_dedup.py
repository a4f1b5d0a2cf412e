"""exact_dedup: group byte-identical files, keep one per group, point the rest at it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curate.parts import GlobalResult
from curate.stage import GlobalStage
from curate.stages.table._dedup import (
    DedupParams,
    _policy_columns,
    duplicate_column,
    duplicates_only,
)


class ExactDedup(GlobalStage):
    """Mark byte-identical files (same content_hash); one copy per group is kept."""

    type = "exact_dedup"
    Params = DedupParams
    params: DedupParams
    verdict_column = "exact_duplicate_of"
    verdict_prefix = "duplicate of "
    marks_duplicates = True

    def reads(self) -> tuple[str, ...]:
        return ("sample_id", "content_hash", *_policy_columns(self.params))

    def writes(self) -> dict[str, pa.DataType]:
        return {"exact_duplicate_of": pa.string()}

    def global_part(self, ex) -> GlobalResult:
        parts = ex.scan(list(self.reads()))
        found = ex.shuffle(parts, "content_hash", _exact_duplicates, self.params)
        return GlobalResult(found, pa.schema([("exact_duplicate_of", pa.string())]))


def _exact_duplicates(table: pa.Table, params: DedupParams) -> pa.Table:
    """The duplicates among rows that share content hashes (all copies of a hash are here)."""
    if table.num_rows == 0:
        return duplicates_only(table, pa.array([], pa.string()), "exact_duplicate_of")
    encoded = pc.dictionary_encode(table["content_hash"]).combine_chunks()
    groups = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int64)
    verdict = duplicate_column(groups, table, params)
    return duplicates_only(table, verdict, "exact_duplicate_of")
