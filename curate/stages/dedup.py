"""exact_dedup and phash_dedup: group copies, keep one per group, point the rest at it."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.registry import register
from curate.stage import Stage, StageParams

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


def check_score_column(keep: str, score_column: str | None) -> None:
    """keep: highest/lowest need a score_column; the other policies take none."""
    needs = keep in ("highest", "lowest")
    if needs and not score_column:
        raise ValueError(f"keep={keep!r} needs score_column")
    if score_column and not needs:
        raise ValueError("score_column is only used with keep: highest or lowest")


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


@register("exact_dedup")
class ExactDedup(Stage):
    """Mark byte-identical files (same content_hash); one copy per group is kept."""

    Params = DedupParams
    params: DedupParams
    verdict_column = "exact_duplicate_of"
    verdict_prefix = "duplicate of "
    marks_duplicates = True

    def reads(self) -> tuple[str, ...]:
        return ("sample_id", "content_hash", *_policy_columns(self.params))

    def writes(self) -> dict[str, pa.DataType]:
        return {"exact_duplicate_of": pa.string()}

    def run_global(self, table: pa.Table, alive: pa.Array) -> dict[str, pa.Array]:
        hashes = pc.if_else(alive, table["content_hash"], pa.scalar(None, pa.string()))
        encoded = pc.dictionary_encode(hashes).combine_chunks()
        groups = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int64)
        return {"exact_duplicate_of": duplicate_column(groups, table, self.params)}


class PhashParams(DedupParams):
    max_distance: int = Field(
        6, ge=0, le=16, description="largest Hamming distance between 64-bit pHashes of copies"
    )


def phash_value(img) -> int:
    """64-bit DCT perceptual hash (imagehash.phash), as an unsigned integer."""
    import imagehash

    bits = imagehash.phash(img, hash_size=8).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


def hamming_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Connected components of the graph 'Hamming distance <= max_distance' over uint64 hashes.

    Equal hashes are collapsed first (so a million blank images cost one vertex); the
    remaining pairs come from faiss's multi-index hashing, which probes only buckets that
    can hold a match instead of comparing all pairs.
    """
    import faiss
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if hashes.size == 0:
        return np.empty(0, dtype=np.int64)
    unique, inverse = np.unique(hashes, return_inverse=True)
    m = unique.size
    if m == 1 or max_distance == 0:
        return inverse.astype(np.int64)
    codes = np.ascontiguousarray(unique.astype(">u8").view(np.uint8).reshape(m, 8))
    nhash, nflip = _multihash_plan(m, max_distance)
    index = faiss.IndexBinaryMultiHash(64, nhash, 64 // nhash)
    index.nflip = nflip
    index.add(codes)
    rows, cols = [], []
    chunk = 262_144  # bounds the result buffers of one range_search call
    for start in range(0, m, chunk):
        lims, _, found = index.range_search(codes[start:start + chunk], max_distance + 1)
        counts = np.diff(lims.astype(np.int64))
        query = np.repeat(np.arange(start, start + counts.size), counts)
        keep = found > query
        rows.append(query[keep])
        cols.append(found[keep])
    r = np.concatenate(rows)
    c = np.concatenate(cols)
    graph = coo_matrix((np.ones(r.size, dtype=np.int8), (r, c)), shape=(m, m))
    _, labels = connected_components(graph, directed=False)
    return labels[inverse].astype(np.int64)


def _multihash_plan(n: int, max_distance: int) -> tuple[int, int]:
    """Pick (tables, bit flips) so every pair within max_distance is found, at least cost.

    With k tables of 64/k bits, two hashes within distance d agree to within
    ceil((d+1)/k)-1 bits on some table (pigeonhole), so that many flips guarantee recall.
    Cost per query: probes per table times the expected bucket size.
    """
    best = None
    for k in (2, 4, 8):
        bits = 64 // k
        flips = math.ceil((max_distance + 1) / k) - 1
        if flips > bits:
            continue
        probes = sum(math.comb(bits, f) for f in range(flips + 1))
        cost = k * probes * (1.0 + n / 2.0**bits)
        if best is None or cost < best[0]:
            best = (cost, k, flips)
    assert best is not None
    return best[1], best[2]


@register("phash_dedup")
class PhashDedup(Stage):
    """Mark near-duplicate images: 64-bit perceptual hashes within max_distance bits."""

    Params = PhashParams
    params: PhashParams
    verdict_column = "phash_duplicate_of"
    verdict_prefix = "near-duplicate of "
    marks_duplicates = True

    def reads(self) -> tuple[str, ...]:
        return ("sample_id", *_policy_columns(self.params))

    def writes(self) -> dict[str, pa.DataType]:
        return {"phash": pa.uint64(), "phash_duplicate_of": pa.string()}

    def needs_pixels(self) -> bool:
        return True

    def row_fingerprint(self) -> dict:
        return {"type": self.type, "bits": 64}

    def process(self, batch: pa.Table, images: list) -> dict[str, pa.Array]:
        values = [None if img is None else phash_value(img) for img in images]
        return {"phash": pa.array(values, pa.uint64())}

    def run_global(self, table: pa.Table, alive: pa.Array) -> dict[str, pa.Array]:
        usable = pc.and_(alive, pc.is_valid(table["phash"])).to_numpy(zero_copy_only=False)
        idx = np.flatnonzero(usable)
        # fill_null first: a nullable uint64 column would become float64 and lose bits.
        hashes = pc.fill_null(table["phash"], 0).to_numpy()[idx].astype(np.uint64)
        groups = np.full(table.num_rows, -1, dtype=np.int64)
        groups[idx] = hamming_groups(hashes, self.params.max_distance)
        return {"phash_duplicate_of": duplicate_column(groups, table, self.params)}
