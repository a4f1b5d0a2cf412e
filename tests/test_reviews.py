"""People's verdicts (curate.reviews): recorded apart from the samples, honoured by every
run after, kept through reruns, threshold changes and undo. The oracles: a plain Python
statement of the rules, the run before any review, and a fresh run on the media without
the rejected file (what the table-wide stages must then have seen)."""

from __future__ import annotations

import copy
import random
import shutil
from datetime import datetime, timezone
from pathlib import Path

import lance
import lancedb
import pyarrow as pa
import pytest

from curate import reviews
from curate.config import StoreConfig, load_config
from curate.export import export
from curate.pipeline import Pipeline
from curate.table.store import Store

from .conftest import demo_config

AT = datetime(2026, 12, 5, tzinfo=timezone.utc)


# --- the rules, against a plain statement of them ----------------------------------------


@pytest.mark.parametrize("args, says", [
    (("maybe", None), "accept, reject, tag or clear"),
    (("tag", None), "a tag needs tags"),
    (("reject", None), "a reject needs a reason"),
    (("reject", "  "), "a reject needs a reason"),
    (("reject", "two\nlines"), "reason must be one line"),
    (("reject", "x" * 501), "at most 500"),
])
def test_bad_verdicts_are_refused_naming_the_field(args, says):
    with pytest.raises(reviews.ReviewError, match=says):
        reviews.entries(["ab"], *args, None, "ana", AT)


def test_a_verdict_needs_a_reviewer_and_short_tags():
    with pytest.raises(reviews.ReviewError, match="reviewer's name is missing"):
        reviews.entries(["ab"], "accept", None, None, " ", AT)
    with pytest.raises(reviews.ReviewError, match="at most 64"):
        reviews.entries(["ab"], "accept", None, ["t" * 65], "ana", AT)
    given = reviews.entries(["ab", "cd"], "accept", None, ["sky", " sky", "dog"], "ana", AT)
    assert given.column("review_tags").to_pylist() == [["sky", "dog"]] * 2


def test_the_last_verdict_of_each_sample_counts_and_clear_takes_it_back():
    rng = random.Random(3)
    log, last = [], {}
    for _ in range(200):
        sample = rng.choice("abcdefgh")
        review = rng.choice(["accept", "reject", "clear"])
        reason = "blurry" if review == "reject" else None
        log.append(reviews.entries([sample], review, reason, None, f"r{len(log)}", AT))
        last[sample] = None if review == "clear" else (review, f"r{len(log) - 1}")
    decided = reviews.latest(pa.concat_tables(log))
    got = {r["sample_id"]: (r["review"], r["reviewed_by"]) for r in decided.to_pylist()}
    assert got == {k: v for k, v in last.items() if v is not None}


def test_a_tag_keeps_the_verdict_and_undo_takes_it_back():
    def state(log):
        return {r["sample_id"]: (r["review"], r["review_reason"], r["review_tags"])
                for r in reviews.latest(log).to_pylist()}

    log = reviews.entries(["a"], "reject", "blurry", ["x"], "ana", AT)
    tag = reviews.tagged(reviews.latest(log), reviews.entries(
        ["a", "b"], "tag", None, ["sky", "x"], "bo", AT))
    assert tag["reviewed_by"].to_pylist() == ["bo", "bo"]
    log = pa.concat_tables([log, tag])
    assert state(log) == {"a": ("reject", "blurry", ["x", "sky"]), "b": (None, None,
                                                                        ["sky", "x"])}
    undo = reviews.undone(log, "bo", AT)
    assert state(pa.concat_tables([log, undo])) == {"a": ("reject", "blurry", ["x"])}
    redo = reviews.undone(pa.concat_tables([log, undo]), "bo", AT)
    assert state(pa.concat_tables([log, undo, redo])) == state(log)  # the tags back
    with pytest.raises(reviews.ReviewError, match="at most 32"):
        reviews.tagged(reviews.latest(log), reviews.entries(
            ["a"], "tag", None, [f"t{i}" for i in range(31)], "bo", AT))


def expected_rules(rows: list[dict], decided: dict[str, str]) -> list[tuple]:
    """(reject_reason, duplicate_of) per row as the rules say, in plain Python."""
    out = []
    for row in rows:
        verdict = decided.get(row["id"])
        reason, duplicate = row["reason"], row["duplicate"]
        if verdict == "reject":
            reason = "review: why"
        elif verdict == "accept" and (duplicate is None or decided.get(duplicate) == "accept"):
            reason, duplicate = None, None
        out.append((reason, duplicate))
    return out


def test_apply_follows_the_rules():
    rng = random.Random(11)
    ids = [f"{i:02x}" for i in range(40)]
    for _ in range(30):
        rows = []
        for sample in ids:
            kind = rng.choice(["kept", "filtered", "duplicate"])
            duplicate = rng.choice(ids) if kind == "duplicate" else None
            reason = {"kept": None, "filtered": "image_quality: too small",
                      "duplicate": f"phash_dedup: near duplicate of {duplicate}"}[kind]
            rows.append({"id": sample, "reason": reason, "duplicate": duplicate})
        decided = {s: rng.choice(["accept", "reject"]) for s in rng.sample(ids, 15)}
        given = pa.concat_tables([
            reviews.entries([s], v, "why" if v == "reject" else None, None, "ana", AT)
            for s, v in decided.items()])
        reason, duplicate, columns, rescued = reviews.apply(
            pa.array(ids), pa.array([r["reason"] for r in rows], pa.string()),
            pa.array([r["duplicate"] for r in rows], pa.string()),
            pa.array([r["reason"] if r["duplicate"] else None for r in rows], pa.string()),
            reviews.latest(given))
        assert list(zip(reason.to_pylist(), duplicate.to_pylist())) == expected_rules(
            rows, decided)
        assert columns["review"].to_pylist() == [decided.get(s) for s in ids]
        assert rescued.to_pylist() == [
            decided.get(r["id"]) == "accept" and r["reason"] is not None and got is None
            for r, got in zip(rows, reason.to_pylist())]


# --- runs honour them ----------------------------------------------------------------------


def run(raw: dict):
    return Pipeline.from_config(load_config(raw)).run(progress=False)


def rows_of(store) -> dict[str, dict]:
    table = lancedb.connect(str(store)).open_table("samples").to_arrow()
    return {r["sample_id"]: r for r in table.to_pylist()}


def review(store, ids: list[str], verdict: str, reason: str | None = None) -> None:
    Store(StoreConfig(uri=str(store))).add_reviews(
        reviews.entries(ids, verdict, reason, ["test"], "ana", datetime.now(timezone.utc)))


def selected(rows: dict[str, dict]) -> set[str]:
    return {k for k, r in rows.items() if r["selected"]}


@pytest.fixture(scope="module")
def reviewed(demo_store, tmp_path_factory):
    """The demo table before any review, a copy to review, and its config."""
    root = tmp_path_factory.mktemp("reviewed")
    store = shutil.copytree(demo_store, root / "store")
    raw = demo_config(demo_store.parent / "media", store, executor="local")
    return rows_of(store), store, raw


def test_runs_honour_people_through_reruns_thresholds_and_undo(reviewed, tmp_path):
    before, store, raw = reviewed
    photos = sorted((k for k, r in before.items() if r["selected"]
                     and "/photos/" in r["uri"]), key=lambda k: before[k]["uri"])
    rejected = photos[0]  # kept by the models; a person rejects it
    by_name = {r["uri"].split("/media/")[-1]: k for k, r in before.items()}
    # left out by the sampler; and dropped by image_quality for its shape, the banner is
    # china.jpg squeezed (examples/make_media.py), so its perceptual hash is china's
    filtered = min((k for k, r in before.items()
                    if (r["reject_reason"] or "").startswith("diversity_sample")),
                   key=lambda k: before[k]["uri"])
    banner = by_name["low_quality/banner.jpg"]
    assert before[banner]["reject_reason"].startswith("image_quality")
    # a copy whose kept copy the models keep to the end (an accepted row that a filter
    # dropped would be weighed by the dedup stages after it, and change their groups)
    copy_id = min((k for k, r in before.items() if r["duplicate_of"]
                   and r["duplicate_of"] != rejected and before[r["duplicate_of"]]["selected"]),
                  key=lambda k: before[k]["uri"])
    kept_copy = before[copy_id]["duplicate_of"]
    review(store, [rejected], "reject", "a watermark")
    review(store, [filtered, copy_id], "accept")

    summary = run(raw)
    assert summary.status == "finished"
    after = rows_of(store)
    # the run tidied the reviews table: one fragment, sample_id indexed for the lookups
    given = lance.dataset(str(store / "samples_reviews.lance"))
    assert [ix.field_names for ix in given.describe_indices()] == [["sample_id"]]
    assert len(given.get_fragments()) == 1 and given.count_rows() == 3
    # the oracle of the table-wide stages: a fresh run on the same files but the rejected
    # one (the same paths, so the same sample ids)
    media = Path(raw["stages"][0]["paths"][0])
    gone = before[rejected]["uri"]
    fresh_raw = copy.deepcopy(raw)
    fresh_raw["store"]["uri"] = str(tmp_path / "fresh")
    fresh_raw["stages"][0]["paths"] = sorted(
        str(p) for p in media.iterdir() if p.name != "photos") + sorted(
        str(p) for p in (media / "photos").iterdir() if str(p) != gone)
    run(fresh_raw)
    fresh = rows_of(tmp_path / "fresh")
    assert set(fresh) == set(before) - {rejected}
    assert after[rejected]["selected"] is False
    assert after[rejected]["reject_reason"] == "review: a watermark"
    assert after[filtered]["selected"] is True and after[filtered]["reject_reason"] is None
    assert after[copy_id]["selected"] is False  # its kept copy stands, not accepted
    assert selected(after) == {k for k, r in fresh.items() if r["selected"]} | {filtered}
    assert after[filtered]["review"] == "accept" and after[filtered]["reviewed_by"] == "ana"
    assert after[filtered]["review_tags"] == ["test"]
    line = summary.stages[-1]
    assert (line.name, line.dropped, line.report) == (
        "review", 1, {"accepted": 2, "rejected": 1,  # the sampler may take it now
                      "rescued": 0 if fresh[filtered]["selected"] else 1, "tagged": 3})
    assert summary.selected == len(selected(after))

    assert run(raw).status == "up_to_date"  # nothing changed: nothing to do, nothing lost
    assert rows_of(store) == after

    # a person accepts the kept copy too, and takes the reject back; a threshold moves
    review(store, [kept_copy], "accept")
    review(store, [rejected], "clear")
    review(store, [photos[1]], "tag")  # tags, no verdict: the models decide
    moved = copy.deepcopy(raw)
    moved["stages"][1]["min_blur"] = raw["stages"][1]["min_blur"] + 1
    summary = run(moved)
    final = rows_of(store)
    assert final[copy_id]["selected"] is True and final[copy_id]["duplicate_of"] is None
    assert final[rejected]["review"] is None
    assert (final[photos[1]]["review"], final[photos[1]]["review_tags"]) == (None, ["test"])
    fresh_moved = copy.deepcopy(moved)
    fresh_moved["store"]["uri"] = str(tmp_path / "fresh-moved")
    run(fresh_moved)
    models = {k: r["selected"] for k, r in rows_of(tmp_path / "fresh-moved").items()}
    assert selected(final) == {k for k, s in models.items() if s} | {filtered, copy_id,
                                                                      kept_copy}
    assert summary.stages[-1].report == {"accepted": 3, "rejected": 0,
                                         "rescued": len({filtered, copy_id, kept_copy}
                                                        - {k for k, s in models.items() if s}),
                                         "tagged": 4}
    # what people accepted, exported by their verdict
    exported = export(StoreConfig(uri=str(store)), {"out": str(tmp_path / "out"),
                                                    "format": "parquet",
                                                    "where": "review = 'accept'"})
    assert exported.written == exported.reviewed == 3

    # accepted past image_quality, the banner is weighed by the dedup stages (which it
    # was not before): a copy of a china photo, and so not kept unless that one is accepted
    review(store, [banner], "accept")
    run(moved)
    last = rows_of(store)
    keeper = last[banner]["phash_duplicate_of"]
    assert "china" in last[keeper]["uri"]
    if last[keeper]["review"] == "accept":  # a person wants both
        assert last[banner]["selected"] is True
    else:
        assert last[banner]["reject_reason"].startswith("phash_dedup: ")
