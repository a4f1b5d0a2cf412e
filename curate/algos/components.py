"""Connected components of a graph too big for one process, on an executor
(curate.engine.executor): the alternating large-star / small-star algorithm of Kiveris et al.,
"Connected Components in MapReduce and Beyond" (SoCC 2014).

Vertices are uint64 values; the component of a vertex is the smallest vertex in it. Each
round is two shuffles keyed by node, vectorised in numpy inside each partition:

- large-star: every node u links each larger neighbour to m(u), the smallest of u and
  its neighbours;
- small-star: every node u links itself and each smaller neighbour to the smallest of
  them.

Both keep the components and end in a forest of stars, each centred on its component's
smallest vertex, which neither round changes any more. The large-star partitions see
each node's whole neighbourhood, so they count the nodes where the edge set is not yet
such a star (a node with two smaller neighbours, or with a smaller and a larger one);
the driver sums those small per-partition summaries (with the edge count and an
order-independent checksum of the edge set) and stops at zero. The driver only holds
O(partitions) numbers; edges stay in the parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curate.parts import Part

#: Rounds (a large-star and a small-star shuffle each) before giving up; the algorithm
#: needs O(log^2 n) rounds at most, and a handful in practice.
MAX_ROUNDS = 64

NODE = "_node"
NBR = "_nbr"
_SUMMARY = b"curate.algos.components"


@dataclass
class Components:
    """`labels`: parts with (vertex, component) for every vertex that has an edge;
    `edges`: distinct edges of the input; `rounds`: large-star passes it took."""

    labels: list[Part]
    edges: int
    rounds: int


def connected_components(ex, edges: list[Part], u: str = "u", v: str = "v",
                         vertex: str = "vertex", component: str = "component",
                         max_rounds: int = MAX_ROUNDS) -> Components:
    """Components of the undirected graph whose edges are the rows (`u`, `v`) of `edges`
    (uint64; duplicates, either orientation and self-loops are fine). Returns parts of
    (`vertex`, `component` = smallest vertex of its component), one row per vertex."""
    parts = ex.map(edges, _both_ways, u, v)
    previous = None
    for rounds in range(1, max_rounds + 1):
        large = ex.shuffle(parts, NODE, _large_star)
        summaries = ex.gather(ex.map(large, _summary))
        count = sum(s[0] for s in summaries)
        checksum = sum(s[1] for s in summaries) % 2**64
        unfinished = sum(s[2] for s in summaries)
        if previous is None:
            distinct = count
        if unfinished == 0:
            return Components(ex.map(large, _labels, vertex, component), distinct, rounds)
        if previous == (count, checksum):
            raise RuntimeError(
                f"connected components: the edge set stopped changing after {rounds} rounds "
                f"but {unfinished} nodes are not in stars (a bug)")
        previous = (count, checksum)
        parts = ex.shuffle(large, NODE, _small_star)
    raise RuntimeError(
        f"connected components did not converge in {max_rounds} rounds of large-star / "
        f"small-star ({count} edges, {unfinished} nodes not yet in stars); raise max_rounds "
        "if the graph is that deep")


# --- inside partitions --------------------------------------------------------------------


def _u64(table: pa.Table, name: str) -> np.ndarray:
    if name not in table.column_names or table.num_rows == 0:
        return np.empty(0, dtype=np.uint64)
    return table[name].to_numpy().astype(np.uint64, copy=False)


def _edge_table(node: np.ndarray, nbr: np.ndarray, summary=None) -> pa.Table:
    metadata = {_SUMMARY: json.dumps(summary).encode()} if summary is not None else None
    return pa.table({NODE: pa.array(node, pa.uint64()), NBR: pa.array(nbr, pa.uint64())},
                    metadata=metadata)


def _distinct(node: np.ndarray, nbr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (node, nbr) pairs, sorted by node then nbr."""
    order = np.lexsort((nbr, node))
    node, nbr = node[order], nbr[order]
    if node.size:
        new = np.r_[True, (node[1:] != node[:-1]) | (nbr[1:] != nbr[:-1])]
        node, nbr = node[new], nbr[new]
    return node, nbr


def _groups(node: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start and size of each run of equal nodes in a sorted array."""
    starts = np.flatnonzero(np.r_[True, node[1:] != node[:-1]]) if node.size else node[:0]
    sizes = np.diff(np.r_[starts, node.size])
    return starts.astype(np.int64), sizes.astype(np.int64)


def checksum(a: np.ndarray, b: np.ndarray) -> int:
    """Order-independent checksum of a set of (a, b) pairs: a sum of mixed pairs mod 2**64."""
    x = a * np.uint64(0x9E3779B97F4A7C15) ^ (b + np.uint64(0x632BE59BD9B4E019))
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return int(x.sum(dtype=np.uint64))


def _both_ways(table: pa.Table, u: str, v: str) -> pa.Table:
    a, b = _u64(table, u), _u64(table, v)
    keep = a != b
    a, b = a[keep], b[keep]
    return _edge_table(np.concatenate([a, b]), np.concatenate([b, a]))


def _large_star(table: pa.Table) -> pa.Table:
    """Rows (node, nbr) hold every edge both ways; each node's rows are all here. Emits
    (v, m(u)) for each neighbour v > u, keyed by v (the larger end) for small-star, and a
    summary of the input edge set."""
    node, nbr = _distinct(_u64(table, NODE), _u64(table, NBR))
    starts, sizes = _groups(node)
    least = np.minimum(nbr[starts], node[starts])  # nbr is sorted within a node
    m = np.repeat(least, sizes)
    smaller = nbr < node
    n_small = np.add.reduceat(smaller.astype(np.int64), starts) if starts.size else starts
    n_large = sizes - n_small
    unfinished = int(np.count_nonzero((n_small > 1) | ((n_small > 0) & (n_large > 0))))
    # each edge is counted once: at its larger end, whose rows are all in this partition
    summary = [int(smaller.sum()), checksum(node[smaller], nbr[smaller]), unfinished]
    out = nbr > node
    return _edge_table(nbr[out], m[out], summary)


def _small_star(table: pa.Table) -> pa.Table:
    """Rows (node, nbr) with nbr < node, keyed by node. Links the node and each of its
    smaller neighbours to the smallest of them; emits both ways for large-star."""
    node, nbr = _distinct(_u64(table, NODE), _u64(table, NBR))
    starts, sizes = _groups(node)
    least = nbr[starts]
    m = np.repeat(least, sizes)
    keep = nbr != m
    a = np.concatenate([nbr[keep], node[starts]])
    b = np.concatenate([m[keep], least])
    a, b = _distinct(a, b)
    return _edge_table(np.concatenate([a, b]), np.concatenate([b, a]))


def _summary(table: pa.Table) -> tuple[int, int, int]:
    metadata = table.schema.metadata or {}
    if _SUMMARY not in metadata:
        return (0, 0, 0)
    count, check, unfinished = json.loads(metadata[_SUMMARY])
    return int(count), int(check), int(unfinished)


def _labels(table: pa.Table, vertex: str, component: str) -> pa.Table:
    """At convergence a large-star partition holds each star it centres, edge by edge
    (child, centre): the children and the centres with their labels."""
    child, centre = _u64(table, NODE), _u64(table, NBR)
    centres = np.unique(centre)
    return pa.table({vertex: pa.array(np.concatenate([child, centres]), pa.uint64()),
                     component: pa.array(np.concatenate([centre, centres]), pa.uint64())})
