"""What exact_dedup and phash_dedup share: keep policies, choosing the kept copy of each group
of copies, and the verdicts pointing the rest at it."""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.parts import ROWADDR
from curate.stage import StageParams
from curate.stages._common import check_score_column

KeepPolicy = Literal["largest", "smallest", "first", "highest", "lowest"]


class DedupParams(StageParams):
    keep: KeepPolicy = Field(
        "largest",
        description="which copy of a group is kept: largest/smallest (pixels, then bytes), "
        "first (by uri), highest/lowest (by score_column)",
    )
    score_column: str | None = Field(
        None, description="column ranking copies when keep is highest or lowest"
    )

    @model_validator(mode="after")
    def _score_column(self):
        check_score_column(self.keep, self.score_column)
        return self


def _policy_columns(params: DedupParams) -> tuple[str, ...]:
    if params.keep in ("largest", "smallest"):
        return ("width", "height", "num_bytes")
    if params.keep == "first":
        return ("uri",)
    return (params.score_column,)


def _rank(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Dense rank of any sortable column (nulls last)."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    order = pc.array_sort_indices(values, null_placement="at_end").to_numpy()
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(len(order))
    return rank


def choose_keepers(groups: np.ndarray, table: pa.Table, params: DedupParams) -> np.ndarray:
    """For each row in a group (group id >= 0), the row index of its group's kept copy.

    Ties are broken by sample_id, so the choice never depends on row order.
    """
    keeper = np.full(len(groups), -1, dtype=np.int64)
    member = np.flatnonzero(groups >= 0)
    if member.size == 0:
        return keeper
    sub = table.take(pa.array(member))
    keys: list[np.ndarray] = [_rank(sub["sample_id"])]
    if params.keep in ("largest", "smallest"):
        sign = -1 if params.keep == "largest" else 1
        pixels = pc.multiply(pc.cast(sub["width"], pa.int64()), pc.cast(sub["height"], pa.int64()))
        keys.append(sign * pc.fill_null(sub["num_bytes"], 0).to_numpy())
        keys.append(sign * pc.fill_null(pixels, 0).to_numpy())
    elif params.keep == "first":
        keys.append(_rank(sub["uri"]))
    else:
        score = pc.cast(sub[params.score_column], pa.float64()).to_numpy(zero_copy_only=False)
        score = np.where(np.isnan(score), -np.inf if params.keep == "highest" else np.inf, score)
        keys.append(-score if params.keep == "highest" else score)
    g = groups[member]
    order = np.lexsort((*keys, g))
    sorted_groups = g[order]
    first = np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]
    kept_of_group = np.full(int(g.max()) + 1, -1, dtype=np.int64)
    kept_of_group[sorted_groups[first]] = member[order[first]]
    keeper[member] = kept_of_group[g]
    return keeper


def duplicate_column(groups: np.ndarray, table: pa.Table, params: DedupParams) -> pa.Array:
    """sample_id of the kept copy for every duplicate; null for kept and ungrouped rows."""
    keeper = choose_keepers(groups, table, params)
    ids = table["sample_id"].to_numpy(zero_copy_only=False)
    is_dup = (keeper >= 0) & (keeper != np.arange(len(keeper)))
    values = np.where(is_dup, ids[np.maximum(keeper, 0)], None)
    return pa.array(values.tolist(), pa.string())


def duplicates_only(table: pa.Table, verdict: pa.Array, column: str) -> pa.Table:
    """`_rowaddr` and `column` of the rows with a verdict."""
    keep = pc.is_valid(verdict)
    return pa.table({ROWADDR: pc.filter(table[ROWADDR], keep) if table.num_rows
                     else pa.array([], pa.uint64()),
                     column: pc.filter(verdict, keep)})
