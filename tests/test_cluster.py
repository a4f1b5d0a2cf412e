"""k-means, semantic dedup and balanced sampling against brute-force answers (no Ray)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from curate.algos.kmeans import (
    _as_matrix,
    balanced_quota,
    choose_by_quota,
    cluster_quotas,
    kmeans,
    normalize_rows,
    semantic_duplicates,
)
from curate.stages import DiversitySample, SemanticDedup

# --- data -------------------------------------------------------------------------------------


def planted(seed: int = 0, background: int = 260, dim: int = 24,
            group_sizes=(2, 2, 2, 3, 3, 3, 4, 4, 5)) -> tuple[np.ndarray, list[list[int]]]:
    """Unit rows: a mixture of a few Gaussian components plus planted near-copy groups,
    shuffled. Returns (rows, groups as lists of row indices)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((6, dim))
    parts = [centers[rng.integers(0, 6, background)] / np.sqrt(dim)
             + rng.standard_normal((background, dim)) / np.sqrt(dim)]
    labels = [-1] * background
    for g, size in enumerate(group_sizes):
        base = (centers[rng.integers(0, 6)] + rng.standard_normal(dim)) / np.sqrt(dim)
        base /= np.linalg.norm(base)
        noise = rng.standard_normal((size, dim)) / np.sqrt(dim)
        scale = rng.uniform(0.02, 0.08, (size, 1))
        parts.append(base + scale * noise)
        labels += [g] * size
    x = np.concatenate(parts).astype(np.float32)
    perm = rng.permutation(len(x))
    x = normalize_rows(x[perm])
    labels = np.asarray(labels)[perm]
    groups = [sorted(np.flatnonzero(labels == g).tolist()) for g in range(len(group_sizes))]
    return x, groups


def safe_eps(x: np.ndarray, wanted: float, margin: float = 1e-4) -> float:
    """An eps near `wanted` with no pair similarity within `margin` of 1 - eps, so float32
    products in any order decide every pair the same way."""
    sims = (x.astype(np.float64) @ x.astype(np.float64).T)[np.triu_indices(len(x), 1)]
    for step in range(200):
        for eps in (wanted + step * 1e-4, wanted - step * 1e-4):
            if 0 < eps < 1 and np.abs(sims - (1 - eps)).min() > margin:
                return eps
    raise AssertionError(f"no safe eps near {wanted}")


def reference_duplicates(x, assignment, eps, priority) -> np.ndarray:
    """The rule, pair by pair in plain Python."""
    n = len(x)
    dup = [-1] * n
    for cluster in sorted(set(assignment.tolist())):
        members = sorted((i for i in range(n) if assignment[i] == cluster),
                         key=lambda i: (priority[i], i))
        for p, i in enumerate(members):
            for j in members[:p]:
                if float(np.dot(x[i].astype(np.float64), x[j].astype(np.float64))) > 1 - eps:
                    dup[i] = j if dup[j] == -1 else dup[j]
                    break
    return np.asarray(dup)


def reference_quota(sizes, target) -> np.ndarray:
    """Water-filling in rounds: equal shares, small clusters give all, repeat; the
    remainder one each to the largest open clusters (ties: lower index)."""
    sizes = [int(s) for s in sizes]
    quota = [0] * len(sizes)
    left = min(target, sum(sizes))
    open_ = [i for i in range(len(sizes)) if sizes[i] > 0]
    while left > 0 and open_:
        share = left // len(open_)
        small = [i for i in open_ if sizes[i] <= share]
        if not small:
            for i in open_:
                quota[i] = share
            rest = left - share * len(open_)
            for i in sorted(open_, key=lambda i: (-sizes[i], i))[:rest]:
                quota[i] += 1
            break
        for i in small:
            quota[i] = sizes[i]
            left -= sizes[i]
        open_ = [i for i in open_ if i not in small]
    return np.asarray(quota)


def reference_choice(assignments, target, priority) -> np.ndarray:
    """Top-down split, cluster by cluster, in plain Python."""
    n = len(priority)
    chosen = np.zeros(n, dtype=bool)

    def rows_of(level, cluster):
        return [i for i in range(n) if assignments[level][i] == cluster]

    def split(level, cluster, quota):
        rows = rows_of(level, cluster)
        if level == 0:
            for i in sorted(rows, key=lambda i: (priority[i], i))[:quota]:
                chosen[i] = True
            return
        children = sorted({int(assignments[level - 1][i]) for i in rows})
        sizes = [len(rows_of(level - 1, c)) for c in children]
        for child, q in zip(children, reference_quota(sizes, quota)):
            split(level - 1, child, int(q))

    top = len(assignments) - 1
    clusters = sorted(set(assignments[top].tolist()))
    sizes = [len(rows_of(top, c)) for c in clusters]
    for cluster, q in zip(clusters, reference_quota(sizes, target)):
        split(top, cluster, int(q))
    return chosen


# --- kmeans ------------------------------------------------------------------------------------


def test_kmeans_assigns_every_row_to_its_nearest_centroid():
    x, _ = planted(seed=1)
    centroids, labels = kmeans(x, 7, seed=3, max_train=100)
    assert centroids.shape == (7, x.shape[1]) and labels.dtype == np.int32
    np.testing.assert_allclose(np.linalg.norm(centroids, axis=1), 1.0, rtol=1e-5)
    sims = x @ centroids.T
    best = sims.max(axis=1)
    assert np.all(sims[np.arange(len(x)), labels] >= best - 1e-6)
    again = kmeans(x, 7, seed=3, max_train=100)
    np.testing.assert_array_equal(again[1], labels)
    np.testing.assert_array_equal(again[0], centroids)


def test_kmeans_recovers_separated_blobs():
    rng = np.random.default_rng(5)
    centers = normalize_rows(rng.standard_normal((4, 32)).astype(np.float32))
    truth = np.repeat(np.arange(4), [70, 60, 50, 40])
    x = normalize_rows(centers[truth] + 0.03 * rng.standard_normal((220, 32)).astype(np.float32))
    _, labels = kmeans(x, 4, seed=0)
    pairs = set(zip(truth.tolist(), labels.tolist()))
    assert len(pairs) == 4  # one label per blob and one blob per label


def test_kmeans_edge_cases():
    x, _ = planted(seed=2)
    small = x[:5]
    centroids, labels = kmeans(small, 9)
    np.testing.assert_array_equal(labels, np.arange(5))
    np.testing.assert_allclose(centroids, small, atol=1e-6)
    centroids, labels = kmeans(x, 1)
    assert set(labels.tolist()) == {0}
    mean = x.astype(np.float64).mean(axis=0)
    np.testing.assert_allclose(centroids[0], mean / np.linalg.norm(mean), atol=1e-5)
    centroids, labels = kmeans(x[:0], 3)
    assert centroids.shape == (0, x.shape[1]) and labels.shape == (0,)
    with pytest.raises(ValueError):
        kmeans(x, 0)


def test_hierarchical_levels_nest():
    x, _ = planted(seed=3)
    fine, mid, coarse = hierarchical_clusters(x, [20, 6, 2], seed=1)
    for child, parent in ((fine, mid), (mid, coarse)):
        for c in np.unique(child):
            assert len(np.unique(parent[child == c])) == 1
    assert len(np.unique(coarse)) <= 2 < len(np.unique(fine)) <= 20


# --- semantic duplicates -------------------------------------------------------------------------


@pytest.mark.parametrize("wanted", [0.01, 0.04, 0.12, 0.35])
def test_semantic_duplicates_match_the_reference(wanted):
    x, _ = planted(seed=4)
    eps = safe_eps(x, wanted)
    rng = np.random.default_rng(0)
    priority = rng.integers(0, 5, len(x)).astype(np.float64)  # many ties: index decides
    _, fitted = kmeans(x, 6, seed=2)
    for assignment in (fitted, rng.integers(0, 3, len(x)).astype(np.int32)):
        expected = reference_duplicates(x, assignment, eps, priority)
        got = semantic_duplicates(x, assignment, eps, priority)
        np.testing.assert_array_equal(got, expected)
        for block in (1, 3, 16):
            np.testing.assert_array_equal(
                semantic_duplicates(x, assignment, eps, priority, block=block), expected)
    assert (expected >= 0).any()


@pytest.mark.parametrize("block", [1, 3, 16, 1024])
def test_each_rows_nearest_in_its_cluster_is_the_brute_force_one(block):
    """The nearest other member of each row's cluster and the cosine distance to it, as
    a float64 brute force over every pair finds them; the duplicates stay the same."""
    x, _ = planted(seed=4)
    rng = np.random.default_rng(1)
    assignment = rng.integers(-1, 4, len(x)).astype(np.int32)  # -1: takes no part
    assignment[:1] = 7  # a cluster of one: no nearest
    priority = rng.integers(0, 5, len(x)).astype(np.float64)
    eps = safe_eps(x, 0.04)
    dup, nearest, distance = semantic_duplicates(x, assignment, eps, priority, block=block,
                                                 nearest=True)
    np.testing.assert_array_equal(dup, semantic_duplicates(x, assignment, eps, priority))
    x64 = x.astype(np.float64)
    for i in range(len(x)):
        others = np.flatnonzero((assignment == assignment[i]) & (np.arange(len(x)) != i))
        if assignment[i] < 0 or not len(others):
            assert nearest[i] == -1 and np.isnan(distance[i])
            continue
        sims = x64[others] @ x64[i]
        assert nearest[i] in others[sims >= sims.max() - 1e-6]
        assert abs(distance[i] - (1 - sims.max())) < 1e-5
        assert dup[i] < 0 or distance[i] < eps  # a copy has a row within eps


def test_a_similarity_at_the_limit_is_compared_in_the_vectors_precision():
    """float32 vectors whose similarity is float32(1 - eps) exactly: the limit is taken
    in float32 too (NumPy's rule for a Python float beside a float32 array), so the pair is
    not a duplicate however the nearest is computed."""
    c = np.float32(0.85)
    x = np.array([[1, 0], [c, np.sqrt(np.float32(1) - c * c)]], np.float32)
    assert (x[0] @ x[1]) == c and float(c) > 0.85
    for nearest in (False, True):
        got = semantic_duplicates(x, np.zeros(2, np.int32), 0.15, np.array([0.0, 1.0]),
                                  nearest=nearest)
        dup = got[0] if nearest else got
        np.testing.assert_array_equal(dup, [-1, -1])


def test_semantic_duplicates_invariants_and_planted_groups():
    x, groups = planted(seed=6)
    eps = safe_eps(x, 0.05)
    assignment = np.zeros(len(x), dtype=np.int32)
    priority = np.arange(len(x), dtype=np.float64)[::-1].copy()  # later rows kept first
    dup = semantic_duplicates(x, assignment, eps, priority, block=8)
    is_dup = dup >= 0
    assert np.all(dup[dup[is_dup]] == -1)  # always points at a kept row
    kept = np.flatnonzero(~is_dup)
    sims = x[kept] @ x[kept].T
    np.fill_diagonal(sims, 0)
    assert sims.max() <= 1 - eps  # no two kept rows are duplicates
    for group in groups:
        keeper = max(group)  # smallest priority
        assert dup[keeper] == -1
        assert all(dup[i] == keeper for i in group if i != keeper)
    assert is_dup.sum() == sum(len(g) - 1 for g in groups)


def test_chains_point_at_the_root_and_the_earliest_match():
    angles = np.radians([0.0, 10.0, 20.0, 45.0, 59.0, 73.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    eps = 1 - np.cos(np.radians(15.0))
    assignment = np.array([0, 0, 0, 1, 1, 1], dtype=np.int32)
    # 0-10-20: 20 matches only 10, which matches 0, so it points at 0 (the root)
    # 45, 73 kept (28 degrees apart); 59 matches both, points at the earlier one
    priority = np.array([0, 1, 2, 5, 9, 3], dtype=np.float64)
    dup = semantic_duplicates(x, assignment, eps, priority)
    np.testing.assert_array_equal(dup, [-1, 0, 0, -1, 5, -1])
    priority[3], priority[5] = 3, 5
    dup = semantic_duplicates(x, assignment, eps, priority)
    np.testing.assert_array_equal(dup, [-1, 0, 0, -1, 3, -1])
    # rows with a negative assignment take no part
    assignment[1] = -1
    dup = semantic_duplicates(x, assignment, eps, priority)
    np.testing.assert_array_equal(dup, [-1, -1, -1, -1, 3, -1])


# --- balanced quota and sampling ---------------------------------------------------------------


def test_balanced_quota_matches_reference_and_is_fair():
    rng = np.random.default_rng(7)
    for _ in range(300):
        m = int(rng.integers(1, 12))
        sizes = rng.integers(0, 40, m) * (rng.random(m) < 0.9)
        target = int(rng.integers(0, int(sizes.sum()) + 20))
        quota = balanced_quota(sizes, target)
        np.testing.assert_array_equal(quota, reference_quota(sizes, target))
        assert quota.sum() == min(target, sizes.sum())
        assert np.all((quota >= 0) & (quota <= sizes))
        open_ = quota < sizes  # a cluster left with rows has at least every quota but one
        if open_.any():
            assert quota.max() <= quota[open_].min() + 1
    np.testing.assert_array_equal(balanced_quota([1, 5, 10, 100], 50), [1, 5, 10, 34])
    np.testing.assert_array_equal(balanced_quota([3, 3, 3], 7), [3, 2, 2])
    np.testing.assert_array_equal(balanced_quota([2, 8], 100), [2, 8])
    assert balanced_quota([], 5).size == 0


def test_balanced_choice_hand_made_hierarchy():
    # coarse A = fine {0: 90 rows, 1: 5 rows}, coarse B = fine {2: 30 rows, 3: 2 rows}
    fine = np.repeat([0, 1, 2, 3], [90, 5, 30, 2])
    coarse = np.where(fine < 2, 0, 1)
    priority = -np.arange(len(fine), dtype=np.float64)  # later rows first
    chosen = balanced_choice([fine, coarse], 20, priority)
    # 10 rows per coarse cluster, then 5 / 5 inside A and 8 / 2 inside B
    np.testing.assert_array_equal(np.bincount(fine[chosen], minlength=4), [5, 5, 8, 2])
    assert chosen[85:90].all() and not chosen[:85].any()  # smallest priority inside fine 0
    # flat: 5 each, the two small ones saturate, 13 left: 7 to the largest, 6 to the next
    flat = balanced_choice([fine], 20, priority)
    np.testing.assert_array_equal(np.bincount(fine[flat], minlength=4), [7, 5, 6, 2])


def balanced_sample(
    x: np.ndarray,
    target: int,
    levels: Sequence[int],
    priority: np.ndarray,
    seed: int = 0,
    *,
    iterations: int = 20,
    max_train: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(chosen (n,) bool, finest cluster id (n,) int32): cluster-balanced selection of
    `target` rows over a hierarchical k-means with cluster counts `levels` (finest first).

    With one level this is plain cluster-balanced sampling.
    """
    x = _as_matrix(x)
    priority = np.asarray(priority, dtype=np.float64)
    if len(priority) != len(x):
        raise ValueError("x and priority must have the same number of rows")
    if len(x) == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int32)
    assignments = hierarchical_clusters(x, levels, seed=seed, iterations=iterations,
                                        max_train=max_train)
    return balanced_choice(assignments, target, priority), assignments[0]


@pytest.mark.parametrize("levels,target", [([9], 40), ([12, 4], 70), ([15, 6, 2], 33)])
def test_balanced_sample_matches_brute_force(levels, target):
    x, _ = planted(seed=8)
    rng = np.random.default_rng(1)
    priority = rng.integers(0, 10, len(x)).astype(np.float64)
    chosen, finest = balanced_sample(x, target, levels, priority, seed=4)
    assignments = hierarchical_clusters(x, levels, seed=4)
    np.testing.assert_array_equal(finest, assignments[0])
    np.testing.assert_array_equal(chosen, reference_choice(assignments, target, priority))
    assert chosen.sum() == target


# --- stages on Arrow tables --------------------------------------------------------------------


def embedding_table(x: np.ndarray, valid: np.ndarray, ids: list[str], **columns) -> pa.Table:
    values = pa.array(x.reshape(-1).astype(np.float32))
    vectors = pa.FixedSizeListArray.from_arrays(values, x.shape[1], mask=pa.array(~valid))
    return pa.table({"sample_id": ids, "clip_embedding": vectors, **columns})


@pytest.fixture()
def stage_data():
    x, groups = planted(seed=9)
    n = len(x)
    rng = np.random.default_rng(2)
    valid = rng.random(n) > 0.05
    alive = rng.random(n) > 0.05
    for group in groups:  # planted copies take part, so the expected answer is known
        valid[group] = alive[group] = True
    ids = [f"id{v:05d}" for v in rng.permutation(n)]
    score = rng.random(n)
    return x, groups, valid, alive, ids, score


def test_semantic_dedup_stage(stage_data):
    x, groups, valid, alive, ids, score = stage_data
    table = embedding_table(x * 3.0, valid, ids, score=score)  # not unit: renormalised
    eps = safe_eps(x, 0.05)
    stage = SemanticDedup(eps=eps, clusters=5, keep="highest", score_column="score")
    assert stage.reads() == ("sample_id", "clip_embedding", "score")
    out = stage.run_global(table, pa.array(alive))
    cluster = out["cluster_id"]
    verdict = out["semantic_duplicate_of"].to_pylist()
    assert cluster.type == pa.int32() and out["semantic_duplicate_of"].type == pa.string()
    used = valid & alive
    assert np.array_equal(cluster.is_valid().to_numpy(zero_copy_only=False), used)
    assert all(v is None for v, u in zip(verdict, used) if not u)
    labels = cluster.to_numpy(zero_copy_only=False)
    for group in groups:
        if len(set(labels[group])) > 1:
            continue  # copies split over clusters are not compared (by design)
        keeper = max(group, key=lambda i: score[i])
        assert verdict[keeper] is None
        assert all(verdict[i] == ids[keeper] for i in group if i != keeper)
    assert stage.report["duplicates"] == sum(v is not None for v in verdict)
    assert stage.report["clusters"] <= 5
    lowest = SemanticDedup(eps=eps, clusters=1, keep="lowest", score_column="score")
    assert_keeps(lowest, table, alive, groups, ids, lambda g: min(g, key=lambda i: score[i]))


def assert_keeps(stage, table, alive, groups, ids, keeper_of):
    """In every planted group, `keeper_of(group)` is kept and the others point at it."""
    verdict = stage.run_global(table, pa.array(alive))["semantic_duplicate_of"].to_pylist()
    for group in groups:
        keeper = keeper_of(group)
        assert all(verdict[i] == (None if i == keeper else ids[keeper]) for i in group)


def test_semantic_dedup_keeps_closest_or_farthest_from_the_centroid(stage_data):
    x, groups, valid, alive, ids, _ = stage_data
    table = embedding_table(x, valid, ids)
    used = valid & alive
    mean = x[used].astype(np.float64).mean(axis=0)
    to_centroid = x @ (mean / np.linalg.norm(mean))
    eps = safe_eps(x, 0.05)
    for keep, pick in (("closest", max), ("farthest", min)):
        stage = SemanticDedup(eps=eps, clusters=1, keep=keep)
        assert_keeps(stage, table, alive, groups, ids,
                     lambda g, pick=pick: pick(g, key=lambda i: to_centroid[i]))


def test_semantic_dedup_ignores_row_order(stage_data):
    x, _, valid, alive, ids, _ = stage_data
    table = embedding_table(x, valid, ids)
    stage = SemanticDedup(eps=0.2, clusters=4, seed=3)
    out = stage.run_global(table, pa.array(alive))
    perm = np.random.default_rng(0).permutation(len(x))
    shuffled = stage.run_global(table.take(perm), pa.array(alive[perm]))
    for name in ("cluster_id", "semantic_duplicate_of", "semantic_nearest",
                 "semantic_nearest_distance"):
        assert shuffled[name].to_pylist() == out[name].take(perm).to_pylist()
    assert sum(v is not None for v in out["semantic_duplicate_of"].to_pylist()) > 0


@pytest.mark.parametrize("n", [0, 1, 3])
def test_stages_on_tiny_tables(n):
    x, _ = planted(seed=10)
    table = embedding_table(x[:n], np.ones(n, dtype=bool), [f"s{i}" for i in range(n)])
    alive = pa.array([True] * n, pa.bool_())
    out = SemanticDedup(clusters=8).run_global(table, alive)
    assert out["semantic_duplicate_of"].null_count == n and len(out["cluster_id"]) == n
    out = DiversitySample(target=2, clusters=[4, 2]).run_global(table, alive)
    assert out["diversity_reason"].to_pylist().count(None) == min(n, 2)


def test_diversity_sample_balances_clusters():
    rng = np.random.default_rng(11)
    centers = normalize_rows(rng.standard_normal((3, 16)).astype(np.float32))
    truth = np.repeat(np.arange(3), [200, 50, 10])
    x = normalize_rows(centers[truth] + 0.05 * rng.standard_normal((260, 16)).astype(np.float32))
    n = len(x)
    alive = np.ones(n, dtype=bool)
    alive[:5] = False  # 5 rows of the big blob dropped earlier
    valid = np.ones(n, dtype=bool)
    valid[5:8] = False  # 3 alive rows without an embedding
    score = rng.random(n)
    table = embedding_table(x, valid, [f"r{i:04d}" for i in range(n)], score=score)
    stage = DiversitySample(target=60, clusters=3, score_column="score")
    out = stage.run_global(table, pa.array(alive))
    reason = out["diversity_reason"].to_pylist()
    chosen = np.array([r is None for r in reason]) & alive & valid
    assert all(reason[i] is None for i in range(5))
    assert all(reason[i] == "not_sampled: no usable embedding" for i in range(5, 8))
    assert chosen.sum() == 60
    np.testing.assert_array_equal(np.bincount(truth[chosen], minlength=3), [25, 25, 10])
    for blob in (0, 1):  # the highest scores of each blob are the ones kept
        members = np.flatnonzero((truth == blob) & alive & valid)
        best = members[np.argsort(-score[members])[:25]]
        assert set(np.flatnonzero(chosen & (truth == blob))) == set(best.tolist())
    assert stage.report["sizes_before"] == "min 10 / median 50 / max 192"
    assert stage.report["sizes_after"] == "min 10 / median 25 / max 25"
    cluster = out["diversity_cluster"]
    assert cluster.null_count == 8 and cluster.type == pa.int32()
    again = DiversitySample(target=60, clusters=3, score_column="score")
    assert again.run_global(table, pa.array(alive))["diversity_reason"].to_pylist() == reason
    shuffled = DiversitySample(target=60, clusters=3)  # seeded random order
    first = shuffled.run_global(table, pa.array(alive))["diversity_reason"].to_pylist()
    assert shuffled.run_global(table, pa.array(alive))["diversity_reason"].to_pylist() == first
    assert first.count(None) == 60 + 5


def test_params_are_validated():
    with pytest.raises(ValidationError, match="needs score_column"):
        SemanticDedup(keep="highest")
    with pytest.raises(ValidationError, match="only used with keep"):
        SemanticDedup(score_column="score")
    with pytest.raises(ValidationError):
        SemanticDedup(eps=1.0)
    with pytest.raises(ValidationError, match="finest to coarsest"):
        DiversitySample(target=10, clusters=[4, 8])
    with pytest.raises(ValidationError, match="only used with score_column"):
        DiversitySample(target=10, order="lowest")
    with pytest.raises(ValidationError):
        DiversitySample()
    assert DiversitySample(target=10, clusters=[8, 4]).levels(1000) == [8, 4]
    assert DiversitySample(target=10).levels(10_000) == [10]
    assert SemanticDedup().writes() == {
        "cluster_id": pa.int32(), "semantic_duplicate_of": pa.string(),
        "semantic_nearest": pa.string(), "semantic_nearest_distance": pa.float32()}


# --- the in-memory reference of diversity sampling (the stage runs it over parts) ------------


def hierarchical_clusters(
    x: np.ndarray,
    levels: Sequence[int],
    seed: int = 0,
    iterations: int = 20,
    max_train: int | None = None,
) -> list[np.ndarray]:
    """Row assignments at every level of a hierarchical k-means, finest first.

    Level 0 clusters the rows into levels[0] clusters; level j clusters the centroids of
    level j-1 into levels[j] clusters, and each row follows its level j-1 cluster.
    """
    if not levels:
        raise ValueError("levels must name at least one cluster count")
    points = _as_matrix(x)
    assignments: list[np.ndarray] = []
    for j, k in enumerate(levels):
        centroids, labels = kmeans(points, int(k), iterations=iterations, seed=seed + j,
                                   max_train=max_train)
        rows = labels if j == 0 else labels[assignments[-1]]
        assignments.append(rows.astype(np.int32))
        points = centroids
    return assignments



def balanced_choice(
    assignments: Sequence[np.ndarray], target: int, priority: np.ndarray
) -> np.ndarray:
    """Rows chosen top-down: `target` is split over the coarsest clusters, each cluster's
    quota over its child clusters, down to the finest (assignments[0]); a finest cluster
    gives its `quota` rows of smallest priority (ties by row index)."""
    priority = np.asarray(priority, dtype=np.float64)
    n = len(priority)
    if n == 0 or target <= 0:
        return np.zeros(n, dtype=bool)
    levels = [np.asarray(a, dtype=np.int64) for a in assignments]
    finest = levels[0]
    sizes = np.bincount(finest)
    tree = []
    for lower, upper in itertools.pairwise(levels):
        parent_of = np.zeros(int(lower.max()) + 1, dtype=np.int64)
        parent_of[lower] = upper
        tree.append(parent_of)
    return choose_by_quota(finest, priority, cluster_quotas(sizes, tree, target))
