"""From per-stage verdict columns to `selected`, `reject_reason`, `duplicate_of`, and the
per-stage funnel. Pure Arrow; no Ray, no store."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from curate import reviews
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


def _chunk(values):
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def final_columns(table: pa.Table, stages: list[Stage],
                  decided: pa.Table | None = None) -> dict[str, pa.Array]:
    """selected, reject_reason (first stage that dropped a row) and duplicate_of; with
    `decided` (people's last verdicts: curate.reviews.latest), those verdicts applied
    (`table` then needs sample_id)."""
    reason, duplicate, as_duplicate = _models(table, stages)
    if decided is not None:
        reason, duplicate, _, _ = reviews.apply(table["sample_id"], reason, duplicate,
                                                as_duplicate, decided)
    return {"selected": pc.is_null(reason), "reject_reason": _chunk(reason),
            "duplicate_of": _chunk(duplicate)}


def _models(table: pa.Table, stages: list[Stage]) -> tuple[pa.Array, pa.Array, pa.Array]:
    """reject_reason and duplicate_of as the stages' verdicts decide them, and the reason
    of the first stage that found the row a duplicate."""
    reason = pa.nulls(table.num_rows, pa.string())
    duplicate = pa.nulls(table.num_rows, pa.string())
    as_duplicate = pa.nulls(table.num_rows, pa.string())
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
            as_duplicate = pc.coalesce(as_duplicate, text)
    return _chunk(reason), _chunk(duplicate), _chunk(as_duplicate)


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


def funnel(table: pa.Table, stages: list[Stage],
           decided: pa.Table | None = None) -> list[StageCount]:
    """Rows in, kept and dropped by reason code for each stage, in order; with `decided`
    (people's last verdicts), a last line `review`: the rows the models kept, those people
    rejected of them, and in its report how many rows people accepted, rejected and kept
    that the models dropped (`rescued`)."""
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
    if decided is not None:
        counts.append(_review_count(table, stages, decided))
    return counts


def _review_count(table: pa.Table, stages: list[Stage], decided: pa.Table) -> StageCount:
    reason, duplicate, as_duplicate = _models(table, stages)
    _, _, columns, rescued = reviews.apply(table["sample_id"], reason, duplicate,
                                           as_duplicate, decided)

    def count(mask) -> int:
        return pc.sum(pc.cast(mask, pa.int64())).as_py() or 0

    review = columns["review"]
    rejected = pc.fill_null(pc.equal(review, reviews.REJECT), False)
    kept_by_models = pc.is_null(reason)
    rows_in = count(kept_by_models)
    dropped = count(pc.and_(kept_by_models, rejected))
    rescued_n = count(rescued)
    return StageCount(reviews.REVIEW_STAGE, reviews.REVIEW_STAGE, rows_in,
                      rows_in - dropped + rescued_n, dropped,
                      {reviews.REVIEW_STAGE: dropped} if dropped else {},
                      report={"accepted": count(pc.equal(review, reviews.ACCEPT)),
                              "rejected": count(rejected), "rescued": rescued_n,
                              "tagged": count(pc.greater(pc.list_value_length(
                                  columns["review_tags"]), 0))})
