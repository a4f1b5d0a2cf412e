"""exact_dedup and phash_dedup: group copies, keep one per group, point the rest at it."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field, model_validator

from curate.executor import GlobalResult
from curate.registry import register
from curate.stage import Stage, StageParams
from curate.tasks import ROWADDR, concat

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

    def global_part(self, ex) -> GlobalResult:
        parts = ex.scan(list(self.reads()))
        found = ex.shuffle(parts, "content_hash", _exact_duplicates, self.params)
        return GlobalResult(found, pa.schema([("exact_duplicate_of", pa.string())]))


def _exact_duplicates(table: pa.Table, params: DedupParams) -> pa.Table:
    """The duplicates among rows that share content hashes (all copies of a hash are here)."""
    if table.num_rows == 0:
        return duplicates_only(table, pa.array([], pa.string()), "exact_duplicate_of")
    encoded = pc.dictionary_encode(table["content_hash"]).combine_chunks()
    groups = pc.fill_null(encoded.indices, -1).to_numpy().astype(np.int64)
    verdict = duplicate_column(groups, table, params)
    return duplicates_only(table, verdict, "exact_duplicate_of")


def duplicates_only(table: pa.Table, verdict: pa.Array, column: str) -> pa.Table:
    """`_rowaddr` and `column` of the rows with a verdict."""
    keep = pc.is_valid(verdict)
    return pa.table({ROWADDR: pc.filter(table[ROWADDR], keep) if table.num_rows
                     else pa.array([], pa.uint64()),
                     column: pc.filter(verdict, keep)})


class PhashParams(DedupParams):
    max_distance: int = Field(
        6, ge=0, le=16, description="largest Hamming distance between 64-bit pHashes of copies"
    )


def phash_value(img) -> int:
    """64-bit DCT perceptual hash, as an unsigned integer: imagehash.phash of a 32x32
    LANCZOS copy of the luma the image's other stages share, made by PIL's two-step resize
    (`reducing_gap`: a box reduction first, then LANCZOS). One LANCZOS pass over a full
    image costs more than decoding it; the two steps agree with it to within 4 of the 64
    bits on photos, and exactly where both sides are under 128 px."""
    import imagehash
    from PIL import Image

    from curate.media import luma

    small = luma(img).resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS,
                             reducing_gap=PHASH_REDUCING_GAP)
    bits = imagehash.phash(small, hash_size=8).hash.flatten()
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


#: imagehash.phash's working size for 64-bit hashes (hash_size 8, highfreq_factor 4).
PHASH_SIDE = 32
PHASH_REDUCING_GAP = 2.0


def hamming_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Connected components of the graph 'Hamming distance <= max_distance' over uint64
    hashes, in this process: a label per hash. The path PhashDedup takes on the cluster
    (band buckets, then large-star / small-star), on one partition."""
    from curate.components import connected_components
    from curate.executor import LocalExecutor

    hashes = np.asarray(hashes, dtype=np.uint64)
    unique, inverse = np.unique(hashes, return_inverse=True)
    if unique.size <= 1 or max_distance == 0:
        return inverse.astype(np.int64)
    ex = LocalExecutor(pa.table({}), pa.array([], pa.bool_()))
    parts = [pa.table({"phash": pa.array(unique, pa.uint64())})]
    labels = concat(connected_components(ex, near_pairs(ex, parts, max_distance)).labels)
    component = unique.copy()
    if labels.num_rows:
        where = np.searchsorted(unique, labels["vertex"].to_numpy())
        component[where] = labels["component"].to_numpy()
    return np.unique(component, return_inverse=True)[1][inverse].astype(np.int64)


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


# --- phash_dedup on the cluster: near pairs by band buckets ---------------------------------

PHASH = "phash"
PHASH_VERDICT = "phash_duplicate_of"
#: Band bucket of a hash: band index in the high 32 bits, the band's value below.
BUCKET = "_bucket"
COMPONENT = "_component"
LINKED = "_linked"
#: Buckets up to this size are compared pair by pair in numpy; larger ones go to faiss
#: (whose index costs more than that below about a thousand hashes).
SMALL_BUCKET = 1024
#: Pairs compared at once in numpy (bounds the memory of one comparison: ~10 bytes each).
PAIR_CELLS = 1 << 22


def bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of max_distance + 1 contiguous bands covering the 64 bits: two hashes
    within max_distance bits agree exactly on at least one of them (pigeonhole)."""
    k = max_distance + 1
    out, shift = [], 64
    for i in range(k):
        width = 64 // k + (1 if i < 64 % k else 0)
        shift -= width
        out.append((shift, (1 << width) - 1))
    return out


def near_pairs(ex, parts: list, max_distance: int) -> list:
    """Parts of edges (u, v), u < v: the distinct `phash` values of `parts` within
    max_distance bits, each pair once. Needs max_distance >= 1."""
    records = ex.map(parts, _band_records, max_distance)
    return ex.shuffle(records, BUCKET, _bucket_edges, max_distance)


def _hashes(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names or table.num_rows == 0:
        return np.empty(0, dtype=np.uint64)
    return table[column].to_numpy().astype(np.uint64, copy=False)


def _band_records(table: pa.Table, max_distance: int) -> pa.Table:
    """One (bucket, hash) per band of each distinct hash of the part."""
    h = np.unique(_hashes(table, PHASH))
    keys = [(np.uint64(b) << np.uint64(32)) | ((h >> np.uint64(shift)) & np.uint64(mask))
            for b, (shift, mask) in enumerate(bands(max_distance))]
    return pa.table({BUCKET: pa.array(np.concatenate(keys), pa.uint64()),
                     PHASH: pa.array(np.tile(h, max_distance + 1), pa.uint64())})


def _bucket_edges(table: pa.Table, max_distance: int) -> pa.Table:
    """Pairs within max_distance among the hashes of each bucket here. A pair is kept only
    in the bucket of the first band its hashes agree on, so each edge comes out once."""
    bucket, h = _hashes(table, BUCKET), _hashes(table, PHASH)
    order = np.lexsort((h, bucket))
    bucket, h = bucket[order], h[order]
    if h.size:
        new = np.r_[True, (bucket[1:] != bucket[:-1]) | (h[1:] != h[:-1])]
        bucket, h = bucket[new], h[new]
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]]) if h.size else order[:0]
    sizes = np.diff(np.r_[starts, h.size]).astype(np.int64)
    band_masks = bands(max_distance)
    us, vs = [np.empty(0, np.uint64)], [np.empty(0, np.uint64)]

    def emit(i: np.ndarray, j: np.ndarray) -> None:
        x = h[i] ^ h[j]
        first = np.full(x.size, len(band_masks), dtype=np.int64)
        for b in range(len(band_masks) - 1, -1, -1):
            shift, mask = band_masks[b]
            first[((x >> np.uint64(shift)) & np.uint64(mask)) == 0] = b
        mine = first == (bucket[i] >> np.uint64(32)).astype(np.int64)
        us.append(h[i[mine]])  # h is sorted within a bucket: h[i] < h[j]
        vs.append(h[j[mine]])

    small = (sizes >= 2) & (sizes <= SMALL_BUCKET)
    for i, j in _close_pairs(h, starts[small], sizes[small], max_distance):
        emit(i, j)
    for start, size in zip(starts[sizes > SMALL_BUCKET], sizes[sizes > SMALL_BUCKET]):
        i, j = _hamming_pairs(h[start:start + size], max_distance)
        emit(i + start, j + start)
    return pa.table({"u": pa.array(np.concatenate(us), pa.uint64()),
                     "v": pa.array(np.concatenate(vs), pa.uint64())})


def _close_pairs(h: np.ndarray, starts: np.ndarray, sizes: np.ndarray, max_distance: int,
                 cells: int = PAIR_CELLS):
    """Index pairs (i, j), i < j, within max_distance bits inside each run
    h[start:start + size], all pairs compared in numpy. Runs of about the same size are
    padded to the same width and compared as a stack of squares, `cells` cells at a time."""
    width = 2
    while starts.size:
        mine = sizes <= width
        run_starts, run_sizes = starts[mine], sizes[mine]
        starts, sizes = starts[~mine], sizes[~mine]
        column = np.arange(width)
        upper = column[:, None] < column[None, :]
        step = max(1, cells // (width * width))
        for lo in range(0, run_starts.size, step):
            size = run_sizes[lo:lo + step, None]
            valid = column[None, :] < size
            index = np.where(valid, run_starts[lo:lo + step, None] + column[None, :], 0)
            values = h[index]
            near = np.bitwise_count(values[:, :, None] ^ values[:, None, :]) <= max_distance
            near &= upper[None] & valid[:, None, :]  # j valid and i < j: i valid too
            hit = np.flatnonzero(near)
            run, cell = np.divmod(hit, width * width)
            a, b = np.divmod(cell, width)
            yield index[run, a], index[run, b]
        width = width * 2 if width < 64 else width + 64  # pads at most 64 columns


def _hamming_pairs(unique: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j, of distinct uint64 hashes within max_distance bits, by
    faiss's multi-index hashing (probes only the buckets that can hold a match)."""
    import faiss

    m = unique.size
    codes = np.ascontiguousarray(unique.astype(">u8").view(np.uint8).reshape(m, 8))
    nhash, nflip = _multihash_plan(m, max_distance)
    index = faiss.IndexBinaryMultiHash(64, nhash, 64 // nhash)
    index.nflip = nflip
    index.add(codes)
    rows, cols = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    chunk = 262_144  # bounds the result buffers of one range_search call
    for start in range(0, m, chunk):
        lims, _, found = index.range_search(codes[start:start + chunk], max_distance + 1)
        counts = np.diff(lims.astype(np.int64))
        query = np.repeat(np.arange(start, start + counts.size), counts)
        keep = found > query
        rows.append(query[keep])
        cols.append(found[keep].astype(np.int64))
    return np.concatenate(rows), np.concatenate(cols)


# --- phash_dedup on the cluster: rows meet their components ---------------------------------


def _with_phash(table: pa.Table) -> pa.Table:
    return table.filter(pc.is_valid(table[PHASH]))


def _no_duplicates() -> pa.Table:
    return pa.table({ROWADDR: pa.array([], pa.uint64()), PHASH_VERDICT: pa.array([], pa.string())})


def _attach_components(table: pa.Table) -> pa.Table:
    """Rows and component labels (tagged by a valid `_component`) of the same hashes: each
    row gets its hash's component (its own hash when the hash has no near neighbour) and
    `_linked` (whether it had one)."""
    n = table.num_rows
    if COMPONENT in table.column_names:
        is_label = pc.is_valid(table[COMPONENT]).to_numpy(zero_copy_only=False)
    else:
        is_label = np.zeros(n, dtype=bool)
    labels = table.filter(pa.array(is_label))
    rows = table.filter(pa.array(~is_label))
    if rows.num_rows == 0 or ROWADDR not in rows.column_names:
        return pa.table({})
    if COMPONENT in rows.column_names:
        rows = rows.drop_columns([COMPONENT])
    label_hash, label_component = _hashes(labels, PHASH), _hashes(labels, COMPONENT)
    order = np.argsort(label_hash)
    label_hash, label_component = label_hash[order], label_component[order]
    h = _hashes(rows, PHASH)
    component, linked = h.copy(), np.zeros(h.size, dtype=bool)
    if label_hash.size:
        at = np.minimum(np.searchsorted(label_hash, h), label_hash.size - 1)
        linked = label_hash[at] == h
        component = np.where(linked, label_component[at], h)
    return (rows.append_column(COMPONENT, pa.array(component, pa.uint64()))
            .append_column(LINKED, pa.array(linked)))


def _duplicates_by(table: pa.Table, column: str, params: DedupParams) -> pa.Table:
    """The duplicates among rows holding whole groups (rows with equal `column`)."""
    if table.num_rows == 0:
        return _no_duplicates()
    groups = np.unique(_hashes(table, column), return_inverse=True)[1].astype(np.int64)
    return duplicates_only(table, duplicate_column(groups, table, params), PHASH_VERDICT)


def _unlinked_duplicates(table: pa.Table, params: DedupParams) -> pa.Table:
    """Rows whose hash has no near neighbour: a group is the rows with that hash, all of
    them in this partition (it was shuffled by hash)."""
    if LINKED not in table.column_names:
        return _no_duplicates()
    return _duplicates_by(table.filter(pc.invert(table[LINKED])), PHASH, params)


def _linked_rows(table: pa.Table) -> pa.Table:
    if LINKED not in table.column_names:
        return pa.table({COMPONENT: pa.array([], pa.uint64())})
    return table.filter(table[LINKED])


def _component_duplicates(table: pa.Table, params: DedupParams) -> pa.Table:
    return _duplicates_by(table, COMPONENT, params)


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
        return {"type": self.type, "bits": 64, "reducing_gap": PHASH_REDUCING_GAP}

    def process(self, batch: pa.Table, images: list) -> dict[str, pa.Array]:
        values = [None if img is None else phash_value(img) for img in images]
        return {"phash": pa.array(values, pa.uint64())}

    def global_part(self, ex) -> GlobalResult:
        """Distinct hashes are the vertices; edges join hashes within max_distance (found
        in band buckets); a group is a connected component (large-star / small-star
        rounds), and the keep policy picks one row per group."""
        from curate.components import connected_components

        distance = self.params.max_distance
        rows = ex.scan(["sample_id", PHASH, *_policy_columns(self.params)], _with_phash)
        labels: list = []
        self.report = {}
        if distance > 0:
            found = connected_components(ex, near_pairs(ex, rows, distance),
                                         vertex=PHASH, component=COMPONENT)
            labels = found.labels
            self.report = {"near_pairs": found.edges, "rounds": found.rounds}
        joined = ex.shuffle(rows + labels, PHASH, _attach_components)
        parts = ex.map(joined, _unlinked_duplicates, self.params)
        if labels:
            linked = ex.map(joined, _linked_rows)
            parts += ex.shuffle(linked, COMPONENT, _component_duplicates, self.params)
        return GlobalResult(parts, pa.schema([(PHASH_VERDICT, pa.string())]))
