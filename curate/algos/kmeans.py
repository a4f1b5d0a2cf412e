"""Clustering of embeddings: spherical k-means, semantic deduplication inside clusters, and
cluster-balanced sampling (flat or hierarchical). Pure numpy + faiss; no Ray, no Arrow.

Rows are unit vectors (float32, shape (n, d)); similarity is the inner product. Every
function is deterministic for a given input and seed, and works in bounded blocks so a
million rows or a cluster of 50,000 members never needs an n x n matrix.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

#: rows per block when assigning rows to centroids or scoring them against centroids
ASSIGN_CHUNK = 65_536
#: training rows per centroid when max_train is not given
TRAIN_PER_CENTROID = 256


def normalize_rows(x: np.ndarray, *, out: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), in blocks; `out` may be `x`."""
    x = np.asarray(x, dtype=np.float32)
    if out is None:
        out = np.empty_like(x)
    for start in range(0, len(x), ASSIGN_CHUNK):
        block = x[start:start + ASSIGN_CHUNK]
        norms = np.sqrt(np.einsum("ij,ij->i", block, block))
        norms[norms == 0] = 1.0
        np.divide(block, norms[:, None], out=out[start:start + ASSIGN_CHUNK])
    return out


def _as_matrix(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a (rows, dim) matrix, got shape {x.shape}")
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    return x


def assign(x: np.ndarray, centroids: np.ndarray, *, chunk: int = ASSIGN_CHUNK) -> np.ndarray:
    """Index of the centroid with the largest inner product, for every row (in chunks)."""
    import faiss

    x = _as_matrix(x)
    centroids = np.ascontiguousarray(_as_matrix(centroids))
    out = np.empty(len(x), dtype=np.int32)
    if len(x) == 0:
        return out
    if len(centroids) == 1:
        out[:] = 0
        return out
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    for start in range(0, len(x), chunk):
        block = np.ascontiguousarray(x[start:start + chunk])
        _, nearest = index.search(block, 1)
        out[start:start + len(block)] = nearest[:, 0]
    return out


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    iterations: int = 20,
    seed: int = 0,
    max_train: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means: (unit centroids (k, d) float32, assignment (n,) int32).

    Centroids are trained on a seeded random sample of at most `max_train` rows (default
    256 per centroid); then every row is assigned to its nearest centroid (inner product)
    in chunks. With k >= n every row is its own cluster and k is lowered to n.
    """
    import faiss

    x = _as_matrix(x)
    n, d = x.shape
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n == 0:
        return np.zeros((0, d), dtype=np.float32), np.zeros(0, dtype=np.int32)
    if k >= n:
        return normalize_rows(x), np.arange(n, dtype=np.int32)
    if k == 1:
        total = np.zeros(d, dtype=np.float64)
        for start in range(0, n, ASSIGN_CHUNK):
            total += x[start:start + ASSIGN_CHUNK].sum(axis=0, dtype=np.float64)
        if not np.any(total):
            total = x[0].astype(np.float64)
        centroid = normalize_rows(total[None, :].astype(np.float32))
        return centroid, np.zeros(n, dtype=np.int32)
    limit = max(k, max_train if max_train is not None else TRAIN_PER_CENTROID * k)
    if n > limit:
        rng = np.random.default_rng(seed)
        sample = np.sort(rng.choice(n, size=limit, replace=False))
        train = x[sample]
    else:
        train = np.ascontiguousarray(x)
    model = faiss.Kmeans(
        d, k, niter=iterations, seed=seed, spherical=True, verbose=False,
        min_points_per_centroid=1,
        # the sample above is the training set; faiss must not subsample it again
        max_points_per_centroid=math.ceil(len(train) / k) + 1,
    )
    model.train(train)
    del train
    centroids = normalize_rows(np.asarray(model.centroids, dtype=np.float32))
    return centroids, assign(x, centroids)


def _first_matches(members: np.ndarray, threshold: float, block: int
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For rows in priority order: position of the first earlier row with similarity >
    threshold, or -1; and every row's most similar other row (position, -1 alone) and that
    similarity (-inf alone). One pass over the tiles (block x block at most) on and below
    the diagonal: each tile gives its rows' best and, seen from the other side, its
    columns' best, so the whole cluster's nearest cost what its first matches cost."""
    m = len(members)
    match = np.full(m, -1, dtype=np.int64)
    nearest = np.full(m, -1, dtype=np.int64)
    best = np.full(m, -np.inf, dtype=np.float64)
    for start in range(0, m, block):
        end = min(start + block, m)
        rows = members[start:end]
        for col in range(0, end, block):
            col_end = min(col + block, end)
            sims = rows @ members[col:col_end].T  # compared in the vectors' own precision
            if col_end > start:  # the tile crosses the diagonal: only earlier rows count
                later = np.arange(col, col_end)[None, :] >= np.arange(start, end)[:, None]
                sims[later] = -np.inf
            hit = sims > threshold
            found = hit.any(axis=1) & (match[start:end] < 0)
            if found.any():
                match[start:end][found] = col + hit[found].argmax(axis=1)
            j = sims.argmax(axis=1)
            value = sims[np.arange(len(j)), j]
            better = value > best[start:end]
            best[start:end][better] = value[better]
            nearest[start:end][better] = col + j[better]
            i = sims.argmax(axis=0)
            value = sims[i, np.arange(len(i))]
            better = value > best[col:col_end]
            best[col:col_end][better] = value[better]
            nearest[col:col_end][better] = start + i[better]
    return match, nearest, best


def semantic_duplicates(
    x: np.ndarray,
    assignment: np.ndarray,
    eps: float,
    priority: np.ndarray,
    *,
    block: int = 1024,
    tiebreak: np.ndarray | None = None,
    nearest: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """duplicate_of (n,) int64: -1 for kept rows, else the row index of the kept copy.
    With `nearest`, also each row's most similar other member of its cluster (row index,
    -1 where it is alone) and the cosine distance to it (NaN alone): the pairs just past
    `eps` that a person may want to call copies.

    Inside each cluster members are ordered by `priority` (smaller first, ties by
    `tiebreak`, default the row index); a member is a duplicate when its cosine similarity
    to any earlier member exceeds 1 - eps, and it points to the kept root of the earliest
    member it matches.
    Rows with a negative assignment take no part. Rows are assumed L2-normalised.
    """
    x = _as_matrix(x)
    assignment = np.asarray(assignment)
    priority = np.asarray(priority, dtype=np.float64)
    n = len(x)
    if len(assignment) != n or len(priority) != n:
        raise ValueError("x, assignment and priority must have the same number of rows")
    if block < 1:
        raise ValueError("block must be >= 1")
    duplicate_of = np.full(n, -1, dtype=np.int64)
    nearest_of = np.full(n, -1, dtype=np.int64)
    distance = np.full(n, np.nan, dtype=np.float64)
    if n == 0:
        return (duplicate_of, nearest_of, distance) if nearest else duplicate_of
    threshold = 1.0 - float(eps)
    order = np.lexsort((np.arange(n) if tiebreak is None else tiebreak, priority, assignment))
    order = order[assignment[order] >= 0]
    groups = assignment[order]
    bounds = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1], True])
    for lo, hi in itertools.pairwise(bounds):
        if hi - lo < 2:
            continue
        rows = order[lo:hi]
        match, near, best = _first_matches(x[rows], threshold, block)
        nearest_of[rows] = np.where(near >= 0, rows[np.maximum(near, 0)], -1)
        distance[rows] = 1.0 - best
        # follow matches to the kept row: matches point strictly backwards, so repeated
        # pointer jumping reaches a member with no match (a kept one)
        root = np.where(match >= 0, match, np.arange(len(rows)))
        while True:
            nxt = root[root]
            if np.array_equal(nxt, root):
                break
            root = nxt
        dup = match >= 0
        duplicate_of[rows[dup]] = rows[root[dup]]
    return (duplicate_of, nearest_of, distance) if nearest else duplicate_of


def balanced_quota(sizes: Sequence[int] | np.ndarray, target: int) -> np.ndarray:
    """Water-filling split of `target` rows over clusters of the given sizes.

    Every cluster gets the same share; a cluster smaller than its share gives all its rows
    and the rest is shared again among the others. The remainder of the integer division
    goes one row each to the largest clusters (ties: lower index). The quotas sum to
    min(target, sum(sizes)) and never exceed a cluster's size.
    """
    sizes = np.asarray(sizes, dtype=np.int64).reshape(-1)
    if np.any(sizes < 0):
        raise ValueError("cluster sizes must be >= 0")
    quota = np.zeros(len(sizes), dtype=np.int64)
    total = int(min(max(int(target), 0), int(sizes.sum())))
    if total == 0:
        return quota
    m = len(sizes)
    order = np.argsort(sizes, kind="stable")
    ascending = sizes[order]
    taken = np.r_[0, np.cumsum(ascending)[:-1]]
    count = m - np.arange(m)
    share = (total - taken) // count
    # clusters saturate in ascending order of size while they fit under the current share
    over = ascending > share
    if not over.any():
        return sizes.copy()
    stop = int(np.argmax(over))
    quota[order[:stop]] = ascending[:stop]
    rest = order[stop:]
    left = total - int(taken[stop])
    each, extra = divmod(left, len(rest))
    quota[rest] = each
    if extra:
        largest_first = rest[np.lexsort((rest, -sizes[rest]))]
        quota[largest_first[:extra]] += 1
    return quota


def cluster_tree(centroids: np.ndarray, levels: Sequence[int], seed: int = 0,
                 iterations: int = 20, max_train: int | None = None) -> list[np.ndarray]:
    """Parents of the finest clusters' centroids at every coarser level: entry j maps each
    level-j cluster to its level j+1 cluster (levels[0] is the finest, given)."""
    tree: list[np.ndarray] = []
    points = _as_matrix(centroids)
    for j, k in enumerate(levels[1:], start=1):
        points, labels = kmeans(points, int(k), iterations=iterations, seed=seed + j,
                                max_train=max_train)
        tree.append(labels.astype(np.int64))
    return tree


def cluster_quotas(sizes: np.ndarray, tree: Sequence[np.ndarray], target: int) -> np.ndarray:
    """Rows each finest cluster gives, top-down: `target` is split over the coarsest
    clusters, each cluster's quota over its child clusters, down to the finest (sizes:
    rows per finest cluster; tree as `cluster_tree` gives it)."""
    sizes = np.asarray(sizes, dtype=np.int64)
    level_sizes = [sizes]
    parents = []  # parents[j]: level-j cluster -> level j+1 cluster
    for up in tree:
        up = np.asarray(up, dtype=np.int64)
        parents.append(up)
        level_sizes.append(np.bincount(up, weights=level_sizes[-1],
                                       minlength=int(up.max()) + 1 if up.size else 0
                                       ).astype(np.int64))
    quota = balanced_quota(level_sizes[-1], target)
    for j in range(len(parents) - 1, -1, -1):
        parent_of, child_sizes = parents[j], level_sizes[j]
        child_quota = np.zeros(len(child_sizes), dtype=np.int64)
        by_parent = np.argsort(parent_of, kind="stable")
        cut = np.flatnonzero(np.r_[True, np.diff(parent_of[by_parent]) != 0, True])
        for lo, hi in itertools.pairwise(cut):
            parent = parent_of[by_parent[lo]]
            if quota[parent] == 0:
                continue
            kids = by_parent[lo:hi]
            child_quota[kids] = balanced_quota(child_sizes[kids], int(quota[parent]))
        quota = child_quota
    return quota


def choose_by_quota(finest: np.ndarray, priority: np.ndarray, quota: np.ndarray,
                    tiebreak: np.ndarray | None = None) -> np.ndarray:
    """Each finest cluster's `quota` rows of smallest priority (ties by `tiebreak`, default
    the row index)."""
    n = len(finest)
    chosen = np.zeros(n, dtype=bool)
    if n == 0:
        return chosen
    finest = np.asarray(finest, dtype=np.int64)
    tiebreak = np.arange(n) if tiebreak is None else tiebreak
    order = np.lexsort((tiebreak, np.asarray(priority, dtype=np.float64), finest))
    groups = finest[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    first_of_group = np.repeat(starts, np.diff(np.r_[starts, n]))
    rank = np.arange(n) - first_of_group
    chosen[order] = rank < quota[groups]
    return chosen


