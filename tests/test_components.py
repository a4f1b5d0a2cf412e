"""Connected components (large-star / small-star) and phash_dedup's distributed path, in
this process (MemoryExecutor, one partition) and as Ray tasks over several partitions."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components as scipy_components

from curate.algos.components import connected_components
from curate.engine.backend import RayBackend
from curate.engine.executor import StoreExecutor
from curate.engine.tasks import concat
from curate.parts import GlobalResult, MemoryExecutor
from curate.stages import PhashDedup
from curate.stages.table._dedup import duplicate_column
from curate.stages.table.phash_dedup import _close_pairs, near_pairs

# --- graphs -------------------------------------------------------------------------------


def relabel(edges: np.ndarray, rng) -> np.ndarray:
    """The same graph on random uint64 labels (above 2**63 too)."""
    nodes = np.unique(edges)
    labels = np.unique(rng.integers(0, 2**64 - 1, size=nodes.size * 2, dtype=np.uint64))
    labels = rng.permutation(labels)[:nodes.size]
    return labels[np.searchsorted(nodes, edges)]


def chain(n: int) -> np.ndarray:
    return np.stack([np.arange(n - 1), np.arange(1, n)], axis=1).astype(np.uint64)


def star(n: int, centre: int) -> np.ndarray:
    leaves = np.array([i for i in range(n) if i != centre], dtype=np.uint64)
    return np.stack([np.full(leaves.size, centre, np.uint64), leaves], axis=1)


def cliques(count: int, size: int) -> np.ndarray:
    i, j = np.triu_indices(size, 1)
    return np.concatenate([np.stack([i, j], 1) + c * size for c in range(count)]).astype(np.uint64)


def sparse_random(n: int, m: int, rng) -> np.ndarray:
    """Many small components, with repeated, reversed edges and self-loops."""
    edges = rng.integers(0, n, size=(m, 2)).astype(np.uint64)
    return np.concatenate([edges, edges[:50, ::-1], edges[:20, [0, 0]]])


def graphs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "chain": chain(2000),
        "chain_relabelled": relabel(chain(2000), rng),
        "star_centre_max": star(400, 399),
        "star_relabelled": relabel(star(400, 0), rng),
        "cliques": relabel(cliques(8, 25), rng),
        "sparse": relabel(sparse_random(3000, 1800, rng), rng),
        "mixed": relabel(np.concatenate([chain(300), star(200, 150) + 300,
                                         cliques(5, 10) + 500,
                                         sparse_random(500, 300, rng) + 600]), rng),
    }


def reference(edges: np.ndarray) -> dict[int, int]:
    """vertex -> smallest vertex of its component, by scipy (self-loops left out)."""
    edges = edges[edges[:, 0] != edges[:, 1]]
    nodes, index = np.unique(edges, return_inverse=True)
    index = index.reshape(edges.shape)
    graph = coo_matrix((np.ones(len(edges)), (index[:, 0], index[:, 1])),
                       shape=(nodes.size, nodes.size))
    _, labels = scipy_components(graph, directed=False)
    least = np.full(labels.max() + 1 if labels.size else 0, np.iinfo(np.uint64).max,
                    dtype=np.uint64)
    np.minimum.at(least, labels, nodes)
    return dict(zip(nodes.tolist(), least[labels].tolist()))


def edge_parts(edges: np.ndarray, parts: int) -> list[pa.Table]:
    chunks = np.array_split(edges, parts)
    return [pa.table({"u": pa.array(c[:, 0], pa.uint64()), "v": pa.array(c[:, 1], pa.uint64())})
            for c in chunks]


def as_dict(ex, labels) -> dict[int, int]:
    table = concat(ex.gather(labels))
    vertex = table["vertex"].to_pylist()
    assert len(vertex) == len(set(vertex)), "one label per vertex"
    return dict(zip(vertex, table["component"].to_pylist()))


def local() -> MemoryExecutor:
    return MemoryExecutor(pa.table({}), pa.array([], pa.bool_()))


# --- components in one process -------------------------------------------------------------

@pytest.mark.parametrize("name", list(graphs()))
def test_components_match_scipy_locally(name):
    edges = graphs()[name]
    ex = local()
    found = connected_components(ex, edge_parts(edges, 3))
    assert as_dict(ex, found.labels) == reference(edges)
    distinct = {tuple(sorted(e)) for e in edges.tolist() if e[0] != e[1]}
    assert found.edges == len(distinct)
    assert found.rounds <= 16  # observed: 12 for the ordered chain of 2000, 2 for stars


def test_components_of_no_edges_and_the_round_cap():
    ex = local()
    found = connected_components(ex, edge_parts(np.zeros((0, 2), np.uint64), 1))
    assert as_dict(ex, found.labels) == {} and found.rounds == 1
    with pytest.raises(RuntimeError, match="did not converge in 2 rounds"):
        connected_components(ex, edge_parts(chain(500), 2), max_rounds=2)


# --- near pairs -------------------------------------------------------------------------------


def brute_pairs(unique: np.ndarray, d: int) -> set[tuple[int, int]]:
    i, j = np.triu_indices(unique.size, 1)
    near = np.bitwise_count(unique[i] ^ unique[j]) <= d
    return set(zip(unique[i[near]].tolist(), unique[j[near]].tolist()))


def planted(n_centres: int, rng, max_flips: int, walk: int = 0) -> np.ndarray:
    """Random hashes around random centres (a few bits flipped), exact repeats, and a
    `walk`: a long chain of hashes a few bits apart (a component of large diameter)."""
    out = []
    for c in rng.integers(0, 2**64 - 1, size=n_centres, dtype=np.uint64, endpoint=True):
        for _ in range(int(rng.integers(1, 5))):
            v = int(c)
            for f in rng.choice(64, int(rng.integers(0, max_flips + 1)), replace=False):
                v ^= 1 << int(f)
            out.append(v)
    v = int(rng.integers(0, 2**63))
    for _ in range(walk):
        for f in rng.choice(64, int(rng.integers(1, 3)), replace=False):
            v ^= 1 << int(f)
        out.append(v)
    out += out[:5]
    return np.array(out, dtype=np.uint64)


@pytest.mark.parametrize("d", [1, 3, 6, 10, 16])
@pytest.mark.parametrize("small_bucket", [1024, 2])  # 2: every bucket through faiss
def test_near_pairs_are_every_close_pair_once(d, small_bucket, monkeypatch):
    import curate.stages.table.phash_dedup as dedup

    monkeypatch.setattr(dedup, "SMALL_BUCKET", small_bucket)
    rng = np.random.default_rng(d)
    hashes = planted(80, rng, d + 3, walk=20)
    ex = local()
    parts = [pa.table({"phash": pa.array(h, pa.uint64())}) for h in np.array_split(hashes, 3)]
    edges = concat(near_pairs(ex, parts, d))
    found = list(zip(edges["u"].to_pylist(), edges["v"].to_pylist()))
    assert len(found) == len(set(found))
    assert set(found) == brute_pairs(np.unique(hashes), d)


@pytest.mark.parametrize("cells", [1, 64, 1 << 22])
def test_close_pairs_in_runs_of_any_size(cells):
    rng = np.random.default_rng(cells)
    sizes = np.array([2, 3, 5, 8, 9, 1, 17, 40, 2])
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    h = np.concatenate([np.sort(rng.integers(0, 1 << 8, n).astype(np.uint64)) for n in sizes])
    got = [p for i, j in _close_pairs(h, starts, sizes, 3, cells) for p in zip(i, j)]
    expected = [(s + a, s + b) for s, n in zip(starts, sizes) for a in range(n)
                for b in range(a + 1, n) if np.bitwise_count(h[s + a] ^ h[s + b]) <= 3]
    assert len(got) == len(set(got)) and set(got) == set(expected)


# --- phash_dedup against the previous implementation -----------------------------------------


def dedup_rows(seed: int, d: int) -> tuple[pa.Table, pa.Array]:
    rng = np.random.default_rng(seed)
    hashes = planted(90, rng, d + 2, walk=25)[:300]
    n = hashes.size
    phash = pa.array([None if i % 37 == 5 else int(h) for i, h in enumerate(hashes)],
                     pa.uint64())
    table = pa.table({
        "sample_id": [f"s{i:04d}" for i in rng.permutation(n)],
        "uri": [f"u{i}" for i in rng.integers(0, 50, n)],
        "width": pa.array(rng.integers(1, 4, n) * 100, pa.int32()),
        "height": pa.array(rng.integers(1, 3, n) * 100, pa.int32()),
        "num_bytes": pa.array(rng.integers(1, 4, n), pa.int64()),
        "score": pa.array([None if i % 11 == 0 else float(x)
                           for i, x in enumerate(rng.integers(0, 5, n))], pa.float64()),
        "phash": phash,
    })
    alive = pa.array([None if i % 41 == 3 else bool(i % 13) for i in range(n)], pa.bool_())
    return table, alive


def previous_verdicts(stage: PhashDedup, table: pa.Table, alive: pa.Array) -> list:
    """What phash_dedup gave before: components of 'distance <= d' over all pairs of the
    alive rows with a hash, then the keep policy."""
    usable = np.array([bool(a) and h is not None
                       for a, h in zip(alive.to_pylist(), table["phash"].to_pylist())])
    idx = np.flatnonzero(usable)
    h = np.array([table["phash"][int(i)].as_py() for i in idx], dtype=np.uint64)
    dist = np.bitwise_count(h[:, None] ^ h[None, :])
    _, labels = scipy_components(dist <= stage.params.max_distance, directed=False)
    groups = np.full(table.num_rows, -1, dtype=np.int64)
    groups[idx] = labels
    return duplicate_column(groups, table, stage.params).to_pylist()


STAGES = [
    dict(max_distance=0),
    dict(max_distance=1),
    dict(max_distance=4, keep="first"),
    dict(max_distance=6),
    dict(max_distance=6, keep="highest", score_column="score"),
    dict(max_distance=10, keep="smallest"),
    dict(max_distance=16, keep="lowest", score_column="score"),
]


@pytest.mark.parametrize("params", STAGES, ids=lambda p: "-".join(map(str, p.values())))
def test_phash_dedup_locally_matches_previous(params):
    stage = PhashDedup(**params)
    table, alive = dedup_rows(params["max_distance"], params["max_distance"])
    expected = previous_verdicts(stage, table, alive)
    assert sum(v is not None for v in expected) > 10
    assert stage.run_global(table, alive)["phash_duplicate_of"].to_pylist() == expected


# --- on Ray, several partitions ------------------------------------------------------------


class TableExecutor(StoreExecutor):
    """StoreExecutor on Ray whose scan reads an Arrow table in several parts instead of
    Lance."""

    def __init__(self, table: pa.Table, alive: pa.Array, parts: int):
        super().__init__(RayBackend(), None, None)
        self.local = MemoryExecutor(table, alive)
        self.parts = parts

    def scan(self, columns, fn=None, *args):
        import ray

        (whole,) = self.local.scan(columns)
        size = -(-whole.num_rows // self.parts)
        chunks = [whole.slice(i * size, size) for i in range(self.parts)]
        return [ray.put(fn(c, *args) if fn is not None else c) for c in chunks]


def test_components_on_ray_match_scipy(ray_session):
    ex = StoreExecutor(RayBackend(), None, None)
    for name in ("chain", "sparse", "mixed"):  # the longest, the most components, all kinds
        edges = graphs()[name]
        parts = [ray_session.put(t) for t in edge_parts(edges, 5)]
        found = connected_components(ex, parts)
        assert as_dict(ex, found.labels) == reference(edges), name
        assert found.rounds <= 16


@pytest.mark.parametrize("params", [STAGES[1], STAGES[3], STAGES[4], STAGES[6]],
                         ids=lambda p: "-".join(map(str, p.values())))
def test_phash_dedup_on_ray_matches_previous(ray_session, params):
    stage = PhashDedup(**params)
    table, alive = dedup_rows(params["max_distance"], params["max_distance"])
    ex = TableExecutor(table, alive, parts=4)
    result = stage.global_part(ex)
    assert len(result.parts) > 4  # several partitions of verdicts
    gathered = GlobalResult(ex.gather(result.parts), result.schema, result.defaults)
    verdicts = MemoryExecutor(table, alive).columns(gathered)["phash_duplicate_of"]
    assert verdicts.to_pylist() == previous_verdicts(stage, table, alive)
    assert stage.report["rounds"] >= 1
