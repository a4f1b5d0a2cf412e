"""Review queues (curate.queues) on a real Lance table of synthetic rows. The oracle of
each queue is a brute-force ordering of ALL rows in plain Python; the queues must give
the same pages while reading only a band of the table."""

from __future__ import annotations

import math
import random

import lance
import numpy as np
import pyarrow as pa
import pytest

from curate import queues, reviews
from curate.stages.table.phash_dedup import PHASH_FLIPS, PhashDedup, dihedral_hashes
from curate.stages.table.semantic_dedup import SemanticDedup
from curate.stats import BINS, of_parts

N = 6000


def _hex(rng: random.Random) -> str:
    return f"{rng.getrandbits(128):032x}"


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    """N rows: two scores (one with nulls), pHashes with flips, small embeddings, and a
    dedup verdict on one row in twenty, pointing at another row."""
    rng = random.Random(5)
    ids = [_hex(rng) for _ in range(N)]
    a = [rng.gauss(5, 1.5) for _ in range(N)]
    b = [None if i % 13 == 0 else rng.random() for i in range(N)]
    phash = [rng.getrandbits(64) for _ in range(N)]
    flips = [None if i % 7 == 0 else [rng.getrandbits(64) for _ in range(3)] for i in range(N)]
    vectors = np.random.default_rng(5).normal(size=(N, 8)).astype(np.float32)
    copy = [ids[rng.randrange(N)] if i % 20 == 3 else None for i in range(N)]
    nearest = [None if i % 11 == 0 else rng.random() ** 3 for i in range(N)]
    data = pa.table({
        "sample_id": ids,
        "selected": [i % 3 != 0 for i in range(N)],
        "aesthetic_score": pa.array(a, pa.float32()),
        "clip_score": pa.array(b, pa.float32()),
        "phash": pa.array(phash, pa.uint64()),
        PHASH_FLIPS: pa.array(flips, pa.list_(pa.uint64(), 3)),
        "clip_embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 8),
        "phash_duplicate_of": pa.array(copy, pa.string()),
        "semantic_duplicate_of": pa.array(copy, pa.string()),
        "semantic_nearest": [None if d is None else ids[rng.randrange(N)] for d in nearest],
        "semantic_nearest_distance": pa.array(nearest, pa.float32()),
    })
    path = tmp_path_factory.mktemp("queues") / "t.lance"
    dataset = lance.write_dataset(data, path, max_rows_per_file=1500)
    for column in ("sample_id", "aesthetic_score", "clip_score", "semantic_nearest_distance"):
        dataset.create_scalar_index(column, "BTREE")
    dataset = lance.dataset(path)
    histograms = of_parts(list, lambda parts, fn, args: [fn(p, *args) for p in parts],
                          [data], data.schema, BINS)["histograms"]
    return dataset, data.to_pylist(), histograms


class Counting:
    """A Lance dataset that counts the rows its scans return."""

    def __init__(self, dataset):
        self.dataset, self.rows = dataset, 0
        self.schema = dataset.schema

    def to_table(self, **kwargs):
        out = self.dataset.to_table(**kwargs)
        self.rows += out.num_rows
        return out

    def count_rows(self, **kwargs):
        return self.dataset.count_rows(**kwargs)

    def scanner(self, **kwargs):
        outer, scanner = self, self.dataset.scanner(**kwargs)

        class Counted:
            def to_batches(self):
                for batch in scanner.to_batches():
                    outer.rows += batch.num_rows
                    yield batch

        return Counted()


def _queue(kind, **fields):
    return queues.Queue(f"{kind}:test", kind, "test", **fields)


def _pages(pager, queue, stage=None, limit=37, depth=300, **kw):
    out = []
    for offset in range(0, depth, limit):
        out += pager.page(queue, stage, offset, min(limit, depth - offset), **kw)["rows"]
    return out


@pytest.mark.parametrize("side, at", [("min", 4.2), ("max", 7.9), ("min", -3.0)])
def test_threshold_pages_are_the_rows_nearest_the_limit(table, side, at):
    dataset, rows, histograms = table
    counting = Counting(dataset)
    pager = queues.Pager(counting, histograms)
    queue = _queue(queues.THRESHOLD, column="aesthetic_score", limit=at, side=side)
    got = _pages(pager, queue)
    # float32 as stored, compared in float64: as the queue does
    expected = sorted(((abs(float(np.float32(r["aesthetic_score"])) - at), r["sample_id"])
                       for r in rows), key=lambda t: (t[0], t[1]))[:300]
    assert [r["sample_id"] for r in got] == [i for _, i in expected]
    for r in got:
        value = r["_queue"]["value"]
        assert r["_queue"]["passes"] == (value >= at if side == "min" else value <= at)
    if at > 0:  # a limit inside the scores: the pages read a band, not the column
        assert counting.rows < N * 8 // 4  # 8 pages, each under a quarter of the table


def test_disagreement_pages_rank_scores_by_the_recorded_histograms(table):
    dataset, rows, histograms = table
    pager = queues.Pager(Counting(dataset), histograms)
    queue = _queue(queues.DISAGREE, column="aesthetic_score", other="clip_score")
    got = _pages(pager, queue, depth=200)
    high, low = queues.Rank(histograms["aesthetic_score"]), queues.Rank(histograms["clip_score"])
    gaps = []
    for r in rows:  # the whole table, one row at a time
        if r["clip_score"] is None:
            continue
        gap = float(high(pa.array([r["aesthetic_score"]], pa.float32()))[0]
                    - low(pa.array([r["clip_score"]], pa.float32()))[0])
        if gap >= 0:
            gaps.append((-gap, r["sample_id"]))
    expected = [i for _, i in sorted(gaps)[:200]]
    assert [r["sample_id"] for r in got] == expected


def test_ranks_follow_the_data_within_a_bin(table):
    _, rows, histograms = table
    values = np.array([r["aesthetic_score"] for r in rows], np.float64)
    rank = queues.Rank(histograms["aesthetic_score"])(pa.array(values))
    empirical = (np.argsort(np.argsort(values)) + 0.5) / len(values)
    # linear within each of the 20 bins: off by at most the share of rows in one bin
    assert np.max(np.abs(rank - empirical)) < 0.08
    edges = histograms["aesthetic_score"]["edges"]
    for d in (0.1, 0.5, 0.9):
        bound = queues.Rank(histograms["aesthetic_score"]).at_least(d)
        assert all(v >= bound for v, r in zip(values, rank) if r >= d)
        top = queues.Rank(histograms["aesthetic_score"]).at_most(d)
        assert all(v <= top for v, r in zip(values, rank) if r <= d)
    assert edges[0] <= values.min() and values.max() <= edges[-1]


def _reference_phash(row, kept) -> float:
    """The least Hamming distance over the row's orientations (as it is and transposed
    only when it has no flips), in plain Python."""
    if row["phash"] is None or kept["phash"] is None:
        return math.nan
    flips = row[PHASH_FLIPS]
    if flips is None:
        from curate.stages.table.phash_dedup import transpose_bits
        turned = [row["phash"], int(transpose_bits(np.array([row["phash"]], np.uint64))[0])]
    else:
        turned = [int(h) for h in dihedral_hashes(np.array([row["phash"]], np.uint64),
                                                  np.array([flips], np.uint64))[0]]
    return min((h ^ kept["phash"]).bit_count() for h in turned)


def _reference_cosine(row, kept) -> float:
    a, b = np.float64(row["clip_embedding"]), np.float64(kept["clip_embedding"])
    return 1 - float(a @ b / np.sqrt((a @ a) * (b @ b)))


@pytest.mark.parametrize("stage, reference", [
    (PhashDedup(max_distance=10, invariance="dihedral"),
     _reference_phash),
    (SemanticDedup(eps=0.2), _reference_cosine),
])
def test_copies_come_farthest_first_with_their_kept_copy(table, stage, reference,
                                                        monkeypatch):
    dataset, rows, histograms = table
    monkeypatch.setattr(queues, "PAIR_BATCH", 64)  # many batches, as on a big table
    monkeypatch.setattr(queues, "MAX_DEPTH", 120)  # the bounded top is what is kept
    by_id = {r["sample_id"]: r for r in rows}
    pager = queues.Pager(Counting(dataset), histograms)
    queue = _queue(queues.DUPLICATES, stage=stage.name, column=stage.verdict_column,
                   limit=stage.pair_limit())
    got = _pages(pager, queue, stage, limit=25, depth=120)
    expected = []
    for r in rows:
        if r[stage.verdict_column] is not None:
            d = reference(r, by_id[r[stage.verdict_column]])
            expected.append((-d, r["sample_id"]))
    expected.sort()
    assert [r["sample_id"] for r in got] == [i for _, i in expected[:120]]
    for r, (d, _) in zip(got, expected):
        assert r["_queue"]["distance"] == pytest.approx(-d, abs=1e-5)
        assert r["_queue"]["kept"] == by_id[r["sample_id"]][stage.verdict_column]
    assert pager.page(queue, stage, 0, 1)["total"] == len(expected)


def test_rows_just_past_a_dedup_limit_come_nearest_first(table):
    """The near queue: rows whose nearest lies past eps, nearest first (ties by id), each
    with that nearest row, as a sort of the whole table gives them; read in bands."""
    dataset, rows, histograms = table
    counting = Counting(dataset)
    pager = queues.Pager(counting, histograms)
    stage = SemanticDedup(eps=0.05)
    queue = next(q for q in queues.plan([stage], dataset.schema, histograms)
                 if q.kind == queues.NEAR)
    got = _pages(pager, queue, stage, depth=400)
    expected = sorted((float(np.float32(r["semantic_nearest_distance"])), r["sample_id"],
                       r["semantic_nearest"]) for r in rows
                      if r["semantic_nearest_distance"] is not None
                      and np.float32(r["semantic_nearest_distance"]) > 0.05
                      and r["semantic_duplicate_of"] is None)[:400]
    assert [(r["_queue"]["distance"], r["sample_id"], r["_queue"]["kept"]) for r in got] == \
        expected
    assert counting.rows < N * 11 // 4  # 11 pages, each under a quarter of the table


def test_the_audit_is_a_seeded_sample_of_the_selection_that_new_rows_do_not_reshuffle(
        table, tmp_path):
    dataset, rows, histograms = table
    pager = queues.Pager(Counting(dataset), histograms)
    queue = _queue(queues.AUDIT)
    got = [r["sample_id"] for r in _pages(pager, queue, depth=150, seed=7, size=150)]
    start = int(__import__("hashlib").sha256(b"curate-audit:7").hexdigest()[:8], 16)
    chosen = sorted((r for r in rows if r["selected"]),
                    key=lambda r: ((int(r["sample_id"][:8], 16) - start) % 16 ** 8,
                                   r["sample_id"]))
    assert got == [r["sample_id"] for r in chosen[:150]]
    other = [r["sample_id"] for r in _pages(pager, queue, depth=150, seed=8, size=150)]
    assert len(set(got) & set(other)) < 30  # another seed, another sample
    # rows added later slot in by id: the earlier sample keeps its order
    rng = random.Random(9)
    added = [{**rows[0], "sample_id": _hex(rng), "selected": True} for _ in range(600)]
    copy = tmp_path / "grown.lance"
    lance.write_dataset(dataset.to_table(), copy)
    grown = lance.write_dataset(pa.Table.from_pylist(added, schema=dataset.schema), copy,
                                mode="append")
    again = [r["sample_id"] for r in _pages(queues.Pager(Counting(grown), histograms),
                                            queue, depth=150, seed=7, size=150)]
    new = {r["sample_id"] for r in added}
    assert new & set(again)  # some of the new rows come early enough to be sampled
    assert [i for i in again if i not in new] == got[:len([i for i in again if i not in new])]


def test_the_audit_keeps_the_rows_people_rejected_since(tmp_path):
    """A run applies people's rejects (selected false, review reject): the sample they
    were judged in keeps them, or the precision would read as all accepts."""
    rng = random.Random(2)
    ids = [_hex(rng) for _ in range(400)]
    review = [("reject" if i % 4 == 0 else "accept" if i % 4 == 1 else None)
              for i in range(400)]
    data = pa.table({"sample_id": ids, "selected": [r != "reject" and i % 3 != 2
                                                    for i, r in enumerate(review)],
                     "review": pa.array(review, pa.string())})
    dataset = lance.write_dataset(data, tmp_path / "a.lance")
    page = queues.Pager(dataset, {}).page(queues.Queue("audit", "audit", "t"), None, 0, 100,
                                          seed=1, size=100)
    start = int(__import__("hashlib").sha256(b"curate-audit:1").hexdigest()[:8], 16)
    judged = sorted((r for r in data.to_pylist() if r["selected"] or r["review"] == "reject"),
                    key=lambda r: ((int(r["sample_id"][:8], 16) - start) % 16 ** 8,
                                   r["sample_id"]))
    assert [r["sample_id"] for r in page["rows"]] == [r["sample_id"] for r in judged[:100]]
    assert (page["total"], page["more"]) == (100, False)


def test_queues_refuse_pages_past_their_depth(table):
    dataset, _, histograms = table
    pager = queues.Pager(dataset, histograms)
    queue = _queue(queues.THRESHOLD, column="aesthetic_score", limit=5.0, side="min")
    with pytest.raises(queues.QueueError, match="paged to 2000 rows deep"):
        pager.page(queue, None, 1990, 20)
    assert len(pager.page(queue, None, 1950, 50)["rows"]) == 50


def test_the_queues_a_table_offers_follow_its_stages_and_scores(table):
    from curate.stages.image.aesthetic_score import AestheticScore

    dataset, _, histograms = table
    aesthetic = AestheticScore(name="aesthetic", weights="w.pth", sha256="0" * 64,
                               min_score=4.5)
    phash = PhashDedup(invariance="dihedral")
    offered = queues.plan([aesthetic, phash, SemanticDedup()], dataset.schema, histograms)
    assert [q.name for q in offered] == [
        "threshold:aesthetic:aesthetic_score:min", "duplicates:phash_dedup",
        "duplicates:semantic_dedup", "near:semantic_dedup",
        "disagree:aesthetic_score:clip_score", "disagree:clip_score:aesthetic_score", "audit"]
    assert queues.index_columns(offered) == ["aesthetic_score", "semantic_nearest_distance",
                                             "clip_score"]


def test_a_moved_limit_projects_the_funnel_line_by_line():
    """The funnel with a limit moved, against the same counts kept by hand: rows the
    tighter limit drops leave every line after it up to the stage that dropped them (to
    the end when they were selected); rows a looser one passes are pending after it."""
    def line(name, rows_in, dropped):
        return {"name": name, "rows_in": rows_in, "kept": rows_in - dropped,
                "dropped": dropped, "seconds": 1.0}

    funnel = [line("a", 100, 10), line("s", 90, 20), line("b", 70, 5), line("dedup", 65, 15),
              line("review", 50, 2)]
    # two rows the models kept to the end (one a person rejected, one a person accepted),
    # one each that b and dedup dropped later, and one of those a person accepted
    moved = {(None, "reject"): 1, (None, "accept"): 1, (None, None): 2, ("b", None): 1,
             ("dedup", None): 1, ("dedup", "accept"): 1}
    got = queues.projected_funnel(funnel, "s", moved, 0, {"dedup"})
    rows = [(g["name"], g["rows_in"], g["kept"], g["dropped"]) for g in got]
    # s drops 7 more; b sees 7 fewer and drops 1 fewer; dedup sees 6 fewer, drops 2
    # fewer; the review line sees the 4 the models kept fewer: one reject fewer, the
    # accepted one still kept (by the person now), the two nobody reviewed gone
    assert rows == [("a", 100, 90, 10), ("s", 90, 63, 27), ("b", 63, 59, 4),
                    ("dedup", 59, 46, 13), ("review", 46, 46, 1)]
    assert [g.get("decided_again") for g in got] == [None, None, False, True, False]
    assert got[-1]["kept"] == funnel[-1]["kept"] - 2  # the two nobody reviewed
    looser = queues.projected_funnel(funnel, "s", {}, 7, {"dedup"})
    assert [(g["kept"], g["dropped"], g.get("pending")) for g in looser] == [
        (90, 10, None), (77, 13, None), (65, 5, 7), (50, 15, 7), (48, 2, 7)]
    assert queues.projected_funnel(funnel, "gone", {(None, None): 1}, 0, set()) == [
        {k: f[k] for k in ("name", "rows_in", "kept", "dropped")} for f in funnel]


def test_the_audit_estimate_is_the_wilson_interval():
    from scipy.stats import binomtest

    for accepted, reviewed in [(3, 4), (0, 5), (50, 50), (37, 120)]:
        ci = binomtest(accepted, reviewed).proportion_ci(method="wilson")
        assert queues.wilson(accepted, reviewed) == pytest.approx((ci.low, ci.high))
    assert queues.wilson(0, 0) is None


def test_undo_gives_the_verdict_before_the_last_one_again():
    from datetime import datetime, timezone

    at = datetime(2026, 12, 5, tzinfo=timezone.utc)
    rng = random.Random(4)
    history = []
    for n in range(120):
        sample = rng.choice("abcdef")
        verdict = rng.choice(["accept", "reject", "clear"])
        # times out of commit order (clocks of two replicas), ties among them
        when = at.replace(minute=rng.randrange(30))
        history.append(reviews.entries([sample], verdict,
                                       f"why {n}" if verdict == "reject" else None,
                                       [f"t{n}"], "ana", when))
    log = pa.concat_tables(history)
    undone = reviews.undone(log, "bo", at).to_pylist()
    # the reference: the log replayed in time order (commit order among ties), each
    # sample's second-to-last entry
    rows = sorted(log.to_pylist(), key=lambda r: r["reviewed_at"])
    for entry in undone:
        mine = [r for r in rows if r["sample_id"] == entry["sample_id"]]
        before = mine[-2] if len(mine) > 1 else {"review": None, "review_reason": None,
                                                 "review_tags": None}
        assert (entry["review"], entry["review_reason"], entry["review_tags"]) == (
            before["review"], before["review_reason"],
            before["review_tags"] if before["review"] else None)
        assert entry["reviewed_by"] == "bo"
    assert sorted(e["sample_id"] for e in undone) == sorted(set("abcdef"))


def test_what_if_is_what_a_run_of_the_moved_config_decides(demo_store, tmp_path):
    """Moving nsfw_score's max and image_quality's min_blur on the demo table: the rows
    the what-if says would leave and enter are those a real rerun of the edited config
    drops and passes at that stage (verdicts decided again from the stored scores)."""
    from curate.catalog import Catalog
    from curate.config import StoreConfig, load_config
    from curate.pipeline import Pipeline
    from curate.table.store import Store

    from .conftest import copy_store, demo_config

    store = copy_store(demo_store, tmp_path / "store")
    catalog = Catalog(StoreConfig(uri=str(store)))
    before = {r["sample_id"]: r for r in Store(StoreConfig(uri=str(store))).read(
        ["sample_id", "selected", "reject_reason", "nsfw_score", "blur"]).to_pylist()}
    nsfw = catalog.whatif("threshold:nsfw_score:nsfw_score:max", 0.02, strip=100)
    blur = catalog.whatif("threshold:image_quality:blur:min", 1.0, strip=100)
    assert nsfw["leaving"] + blur["entering"] > 0  # the moves change something here

    raw = demo_config(media=demo_store.parent / "media", store=store, executor="local")
    for stage in raw["stages"]:
        if stage["type"] == "nsfw_score":
            stage["max_score"] = 0.02
        if stage["type"] == "image_quality":
            stage["min_blur"] = 1.0
    Pipeline.from_config(load_config(raw)).run(progress=False)
    after = {r["sample_id"]: r for r in Store(StoreConfig(uri=str(store))).read(
        ["sample_id", "nsfw_reason", "quality_reason"]).to_pylist()}
    left = {i for i, r in before.items() if r["selected"] and after[i]["nsfw_reason"]}
    entered = {i for i, r in before.items()
               if (r["reject_reason"] or "").startswith("image_quality: ")
               and after[i]["quality_reason"] is None}
    assert {r["sample_id"] for r in nsfw["leave"]} == left and nsfw["leaving"] == len(left)
    assert {r["sample_id"] for r in blur["enter"]} == entered
    assert blur["entering"] == len(entered) and blur["leaving"] == 0
    assert nsfw["selected_after"] == nsfw["selected"] - len(left)
