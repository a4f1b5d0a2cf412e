"""People's verdicts on samples: accept, reject (with a reason) or tags, given in the
gallery or through the API, and how runs honour them. Pure Arrow; no Ray, no store.

Reviews are kept apart from the samples, in `<table>_reviews` (curate.table.store), one
row per verdict given, oldest first: reviewing never rewrites the samples table, so it
never waits for a run, and a run never loses a verdict. Each run's verdict phase merges
the last verdict of each sample into the samples table's review columns and into
`selected`:

- a person's reject drops the row whatever the models say (`reject_reason`
  `review: <reason>`), and the table-wide stages (dedup, sampling) do not see it: a
  rejected kept copy of a duplicate group leaves another copy kept, and a sampler fills
  its target from the rest;
- a person's accept keeps the row through the model filters, and the dedup stages weigh
  it even where a filter dropped it: a duplicate stays one while its kept copy stands
  (`reject_reason` names the dedup stage), unless a person accepted that copy too (they
  want both);
- `clear` takes a sample's verdict back (the gallery's undo);
- `tag` adds free tags and leaves the verdict as it was (`tagged`): a sample with tags and
  no verdict is one nobody accepted or rejected.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

ACCEPT, REJECT, CLEAR, TAG = "accept", "reject", "clear", "tag"
#: The samples table's columns of the reviews (null where no person decided).
REVIEW_COLUMNS: dict[str, pa.DataType] = {
    "review": pa.string(),  # accept | reject
    "review_reason": pa.string(),
    "review_tags": pa.list_(pa.string()),
    "reviewed_by": pa.string(),
    "reviewed_at": pa.timestamp("us", tz="UTC"),
}
#: One row per verdict given (review null: a `clear`).
REVIEWS_SCHEMA = pa.schema([("sample_id", pa.string()), *REVIEW_COLUMNS.items()])
#: The stage name of people's rejects in `reject_reason` and in the funnel.
REVIEW_STAGE = "review"
MAX_REASON = 500
MAX_TAGS = 32
MAX_TAG = 64
MAX_NAME = 128


class ReviewError(ValueError):
    """A verdict that cannot be recorded; the message says which field and why."""


def one_line(value: str | None, what: str, limit: int) -> str | None:
    if value is None:
        return None
    value = value.strip()
    if len(value) > limit:
        raise ReviewError(f"{what} is {len(value)} characters long; at most {limit}")
    if any(c in value for c in "\r\n\t\x00"):
        raise ReviewError(f"{what} must be one line of text")
    return value or None


def checked_reviewer(reviewer: str | None) -> str:
    """The reviewer's name, one short line; a missing one is an error."""
    reviewer = one_line(reviewer, "reviewer", MAX_NAME)
    if not reviewer:
        raise ReviewError("the reviewer's name is missing: send it as X-Curate-Reviewer "
                          "(or `reviewer` in the body)")
    return reviewer


def entries(sample_ids: list[str], review: str, reason: str | None, tags: list[str] | None,
            reviewer: str | None, at: datetime) -> pa.Table:
    """The rows of `<table>_reviews` for one verdict on `sample_ids`, checked: a reject
    needs a reason, tags are short words, the reviewer's name one short line."""
    if review not in (ACCEPT, REJECT, CLEAR, TAG):
        raise ReviewError(f"review is {review!r}; it must be accept, reject, tag or clear")
    reason = one_line(reason, "reason", MAX_REASON)
    if review == REJECT and not reason:
        raise ReviewError("a reject needs a reason (what is wrong with the sample)")
    clean_tags = []
    for tag in tags or []:
        tag = one_line(tag, f"tag {tag!r}", MAX_TAG)
        if tag and tag not in clean_tags:
            clean_tags.append(tag)
    if len(clean_tags) > MAX_TAGS:
        raise ReviewError(f"{len(clean_tags)} tags; at most {MAX_TAGS}")
    if review == TAG and not clean_tags:
        raise ReviewError("a tag needs tags (words, separated by commas in the gallery)")
    reviewer = checked_reviewer(reviewer)
    if not sample_ids:
        raise ReviewError("no sample_ids given")
    n = len(sample_ids)
    cleared = review == CLEAR
    verdict = review in (ACCEPT, REJECT)
    return pa.table({
        "sample_id": pa.array(sample_ids, pa.string()),
        "review": pa.array([review if verdict else None] * n, pa.string()),
        "review_reason": pa.array([reason if verdict else None] * n, pa.string()),
        "review_tags": pa.array([None if cleared else clean_tags] * n,
                                pa.list_(pa.string())),
        "reviewed_by": pa.array([reviewer] * n, pa.string()),
        "reviewed_at": pa.array([at] * n, pa.timestamp("us", tz="UTC")),
    }, schema=REVIEWS_SCHEMA)


def latest(given: pa.Table) -> pa.Table:
    """Each sample's last verdict (by `reviewed_at`, the time the server took it; of two
    at the same time the one read later, as the reviews table is read in commit order),
    without the samples whose last word was `clear` (no verdict, no tags)."""
    if not given.num_rows:
        return REVIEWS_SCHEMA.empty_table()
    given = given.take(pc.sort_indices(  # stable: ties keep commit order
        given.select(["reviewed_at"]), sort_keys=[("reviewed_at", "ascending")]))
    order = pa.array(np.arange(given.num_rows))
    last = (given.select(["sample_id"]).append_column("_order", order)
            .group_by("sample_id").aggregate([("_order", "max")]))
    picked = given.take(last["_order_max"])
    return picked.filter(pc.or_(pc.is_valid(picked["review"]), _tagged(picked)))


def _tagged(given: pa.Table) -> pa.ChunkedArray:
    return pc.fill_null(pc.greater(pc.list_value_length(given["review_tags"]), 0), False)


def tagged(current: pa.Table, given: pa.Table) -> pa.Table:
    """`tag` entries (`given`) that keep each sample's verdict in `current` (`latest`'s
    rows): its review and reason stay, its tags gain the new ones."""
    now = aligned(given["sample_id"], current)
    tags = [list(dict.fromkeys((old or []) + new)) for old, new in zip(
        now["review_tags"].to_pylist(), given["review_tags"].to_pylist())]
    most = max(map(len, tags), default=0)
    if most > MAX_TAGS:
        raise ReviewError(f"a sample would have {most} tags; at most {MAX_TAGS}")
    return (given.set_column(1, "review", now["review"])
            .set_column(2, "review_reason", now["review_reason"])
            .set_column(3, "review_tags", pa.array(tags, pa.list_(pa.string()))))


def undone(history: pa.Table, reviewer: str, at: datetime) -> pa.Table:
    """Entries that take back each sample's last verdict in `history` (its verdicts, in
    commit order): the verdict before it again, given by `reviewer` at `at`, or `clear`
    where there was none. A second undo gives the verdict back. Samples without history
    get no entry."""
    if not history.num_rows:
        return REVIEWS_SCHEMA.empty_table()
    history = history.take(pc.sort_indices(  # stable: ties keep commit order
        history.select(["reviewed_at"]), sort_keys=[("reviewed_at", "ascending")]))
    ids = history["sample_id"].to_pylist()
    before: dict[str, int | None] = {}
    last: dict[str, int] = {}
    for i, sample_id in enumerate(ids):
        before[sample_id] = last.get(sample_id)
        last[sample_id] = i
    out = []
    for sample_id, index in before.items():
        if index is None:
            out.append(entries([sample_id], CLEAR, None, None, reviewer, at))
            continue
        row = history.slice(index, 1).to_pylist()[0]
        kind = row["review"] or (TAG if row["review_tags"] else CLEAR)
        out.append(entries([sample_id], kind, row["review_reason"], row["review_tags"],
                           reviewer, at))
    return pa.concat_tables(out)


def aligned(sample_ids: pa.ChunkedArray | pa.Array, decided: pa.Table) -> pa.Table:
    """The review columns for rows `sample_ids` (nulls where no person decided), from
    `latest`'s table."""
    where = pc.index_in(sample_ids, value_set=decided["sample_id"])
    return decided.select(list(REVIEW_COLUMNS)).take(where)


#: Lance filter of the rows people did not reject (for the table-wide stages).
NOT_REJECTED = f"(review IS NULL OR review <> '{REJECT}')"


def apply(sample_ids, reason: pa.Array, duplicate: pa.Array, as_duplicate: pa.Array,
          decided: pa.Table) -> tuple[pa.Array, pa.Array, pa.Table, pa.Array]:
    """The models' `reject_reason` and `duplicate_of` of some rows with people's verdicts
    applied (the module says how); also the rows' review columns, and which rows a
    person's accept kept that the models dropped. `as_duplicate`: the reason of the
    stage that found each row a duplicate, which an accepted duplicate keeps."""
    columns = aligned(sample_ids, decided)
    review = columns["review"]
    rejected = pc.fill_null(pc.equal(review, REJECT), False)
    accepted = pc.fill_null(pc.equal(review, ACCEPT), False)
    # a duplicate is kept by a person only where they accepted its kept copy too
    copy_accepted = pc.is_valid(pc.index_in(
        duplicate, value_set=decided.filter(pc.equal(decided["review"], ACCEPT))["sample_id"]))
    keeps = pc.and_(accepted, pc.or_(pc.is_null(duplicate), copy_accepted))
    rescued = pc.and_(keeps, pc.is_valid(reason))
    why = pc.binary_join_element_wise(f"{REVIEW_STAGE}: ", columns["review_reason"], "")
    # accepted, but a duplicate of a copy kept: dropped as that, not by a filter before
    reason = pc.if_else(pc.and_(accepted, pc.is_valid(duplicate)), as_duplicate, reason)
    reason = pc.if_else(rejected, why, pc.if_else(keeps, pa.scalar(None, pa.string()),
                                                  reason))
    duplicate = pc.if_else(keeps, pa.scalar(None, pa.string()), duplicate)
    return reason, duplicate, columns, rescued
