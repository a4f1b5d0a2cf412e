"""From per-stage verdict columns to `selected`, `reject_reason`, `duplicate_of`, and the
per-stage funnel. Pure Arrow; no Ray, no store."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from curate.media.decode import error_code
from curate.stage import Stage


def alive_mask(table: pa.Table, verdict_columns: list[str]) -> pa.Array:
    """Rows with no verdict in any of `verdict_columns` (those the table lacks are not
    decided yet and drop nothing)."""
    alive = pa.array([True] * table.num_rows, pa.bool_())
    for column in verdict_columns:
        if column in table.column_names:
            alive = pc.and_(alive, pc.is_null(table[column]))
    return alive


def alive_before(table: pa.Table, stages: list[Stage], index: int) -> pa.Array:
    """Rows that no stage before `stages[index]` dropped."""
    return alive_mask(table, [s.verdict_column for s in stages[:index] if s.verdict_column])


def final_columns(table: pa.Table, stages: list[Stage]) -> dict[str, pa.Array]:
    """selected, reject_reason (first stage that dropped a row) and duplicate_of."""
    reason = pa.nulls(table.num_rows, pa.string())
    duplicate = pa.nulls(table.num_rows, pa.string())
    for stage in stages:
        column = stage.verdict_column
        if not column or column not in table.column_names:
            continue
        verdict = table[column]
        text = pc.binary_join_element_wise(
            f"{stage.name}: {stage.verdict_prefix}", verdict, ""
        )
        reason = pc.coalesce(reason, text)
        if stage.marks_duplicates:
            duplicate = pc.coalesce(duplicate, verdict)
    return {
        "selected": pc.is_null(reason),
        "reject_reason": reason.combine_chunks() if isinstance(reason, pa.ChunkedArray) else reason,
        "duplicate_of": (
            duplicate.combine_chunks() if isinstance(duplicate, pa.ChunkedArray) else duplicate
        ),
    }


@dataclass
class StageCount:
    """One line of the funnel."""

    name: str
    type: str
    rows_in: int
    kept: int
    dropped: int
    reasons: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    rows_computed: int = 0  # rows this stage computed in this run
    rows_reused: int = 0  # rows whose columns of this stage stay as an earlier run made them
    verdicts_redecided: int = 0  # verdicts decided again from stored scores (thresholds)
    report: dict = field(default_factory=dict)  # what a global stage reported

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def funnel(table: pa.Table, stages: list[Stage]) -> list[StageCount]:
    """Rows in, kept and dropped by reason code for each stage, in order."""
    counts = []
    for i, stage in enumerate(stages):
        alive = alive_before(table, stages, i)
        rows_in = pc.sum(pc.cast(alive, pa.int64())).as_py() or 0
        reasons: Counter[str] = Counter()
        column = stage.verdict_column
        if column and column in table.column_names:
            dropped_mask = pc.and_(alive, pc.is_valid(table[column]))
            dropped_values = pc.filter(table[column], dropped_mask).to_pylist()
            if stage.marks_duplicates and dropped_values:
                reasons[stage.verdict_prefix.strip().removesuffix(" of")] = len(dropped_values)
            elif not stage.marks_duplicates:
                reasons.update(error_code(v) for v in dropped_values)
        dropped = sum(reasons.values())
        counts.append(StageCount(stage.name, stage.type, rows_in, rows_in - dropped, dropped,
                                 dict(reasons.most_common())))
    return counts
