"""phash_dedup: group near-duplicate images by 64-bit perceptual hash, keep one per group,
point the rest at it."""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import Field

from curate.parts import ROWADDR, GlobalResult
from curate.stage import GlobalStage, RowStage
from curate.stages.table._dedup import (
    DedupParams,
    _policy_columns,
    duplicate_column,
    duplicates_only,
)


class PhashParams(DedupParams):
    max_distance: int = Field(
        6, ge=0, le=16, description="largest Hamming distance between 64-bit pHashes of copies"
    )
    invariance: Literal["none", "dihedral"] = Field(
        "none",
        description="dihedral: an image's mirror images and 90/180/270 degree turns count as "
        "copies of it too (the distance is the least over the 8 orientations; adds the "
        "phash_flips column)",
    )


def phash_value(img) -> int:
    """64-bit DCT perceptual hash, as an unsigned integer: imagehash.phash of a 32x32
    LANCZOS copy of the luma the image's other stages share, made by PIL's two-step resize
    (`reducing_gap`: a box reduction first, then LANCZOS). One LANCZOS pass over a full
    image costs more than decoding it; the two steps agree with it to within 4 of the 64
    bits on photos, and exactly where both sides are under 128 px."""
    return int(hash_bits(phash_block(img)[None])[0])


#: imagehash.phash's working size for 64-bit hashes (hash_size 8, highfreq_factor 4).
PHASH_SIDE = 32
PHASH_REDUCING_GAP = 2.0


def phash_block(img) -> np.ndarray:
    """The 8x8 lowest frequencies (rows: vertical, columns: horizontal) of the 2-D DCT of
    the 32x32 luma copy the pHash is taken from, computed as imagehash.phash computes it
    (scipy's unnormalised DCT-II down the columns, then along the rows)."""
    import scipy.fftpack
    from PIL import Image

    from curate.media.decode import luma

    small = luma(img).resize((PHASH_SIDE, PHASH_SIDE), Image.Resampling.LANCZOS,
                             reducing_gap=PHASH_REDUCING_GAP)
    dct = scipy.fftpack.dct(scipy.fftpack.dct(np.asarray(small), axis=0), axis=1)
    return dct[:8, :8]


def hash_bits(blocks: np.ndarray) -> np.ndarray:
    """The pHash of each 8x8 DCT block of `blocks` (shape (n, 8, 8)): bit 63 - (8u + v)
    set where coefficient (u, v) is above the block's median."""
    flat = blocks.reshape(len(blocks), 64)
    bits = flat > np.median(flat, axis=1)[:, None]
    return np.packbits(bits, axis=1).view(">u8").ravel().astype(np.uint64)


_FREQ = np.arange(8)
#: Signs of the DCT coefficients of an image mirrored left-right, top-bottom and both
#: (turned 180 degrees): mirroring n -> N-1-n multiplies coefficient k by (-1)^k, along
#: the axis mirrored. The DC term keeps its sign; the median is taken again per variant.
FLIP_SIGNS = np.array([np.where(_FREQ[None, :] % 2, -1.0, 1.0) * np.ones((8, 1)),
                       np.where(_FREQ[:, None] % 2, -1.0, 1.0) * np.ones((1, 8)),
                       np.where((_FREQ[:, None] + _FREQ[None, :]) % 2, -1.0, 1.0)])
PHASH_FLIPS = "phash_flips"


def flip_hashes(blocks: np.ndarray) -> np.ndarray:
    """(n, 3) pHashes of the images of `blocks` (n, 8, 8) mirrored left-right, top-bottom
    and both, from their DCT blocks alone (no second resize)."""
    signed = blocks[:, None, :, :] * FLIP_SIGNS[None]
    return hash_bits(signed.reshape(-1, 8, 8)).reshape(len(blocks), 3)


def transpose_bits(h: np.ndarray) -> np.ndarray:
    """pHashes of the transposed images: a transpose swaps the DCT's indices and keeps
    its median, so its hash is the 8x8 bit matrix transposed (three delta swaps)."""
    x = np.asarray(h, dtype=np.uint64).copy()
    for shift, mask in ((7, 0x00AA00AA00AA00AA), (14, 0x0000CCCC0000CCCC),
                        (28, 0x00000000F0F0F0F0)):
        s = np.uint64(shift)
        t = (x ^ (x >> s)) & np.uint64(mask)
        x ^= t ^ (t << s)
    return x


def dihedral_hashes(phash: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """(n, 8) pHashes of the images as they are, mirrored left-right, top-bottom, turned
    180 degrees, then transposed, turned 90 and 270 degrees (PIL's ROTATE_90, ROTATE_270)
    and transversed, from their pHashes (n,) and `flip_hashes` (n, 3)."""
    plain = np.column_stack([np.asarray(phash, np.uint64), np.asarray(flips, np.uint64)])
    return np.column_stack([plain, transpose_bits(plain)])


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
#: Records of another orientation of an image: the image's own pHash (dihedral invariance).
ORIGIN = "_origin"


def bands(max_distance: int) -> list[tuple[int, int]]:
    """(shift, mask) of max_distance + 1 contiguous bands covering the 64 bits (at least
    2, so that a band fits below a bucket's band index): two hashes within max_distance
    bits agree exactly on at least one of them (pigeonhole)."""
    k = max(max_distance, 1) + 1
    out, shift = [], 64
    for i in range(k):
        width = 64 // k + (1 if i < 64 % k else 0)
        shift -= width
        out.append((shift, (1 << width) - 1))
    return out


def near_pairs(ex, parts: list, max_distance: int) -> list:
    """Parts of edges (u, v): the distinct `phash` values of `parts` within max_distance
    bits, each pair once (u < v). Where the parts have `phash_flips` (dihedral
    invariance), also the pairs (u, v) where one of the other 7 orientations of an image
    hashed u is within max_distance of v; those may come more than once, either way
    round."""
    records = ex.map(parts, _band_records, max_distance)
    return ex.shuffle(records, BUCKET, _bucket_edges, max_distance)


def _hashes(table: pa.Table, column: str) -> np.ndarray:
    if column not in table.column_names or table.num_rows == 0:
        return np.empty(0, dtype=np.uint64)
    return table[column].to_numpy().astype(np.uint64, copy=False)


def _band_keys(h: np.ndarray, max_distance: int) -> np.ndarray:
    """The bucket of each hash in each band, band after band."""
    return np.concatenate(
        [(np.uint64(b) << np.uint64(32)) | ((h >> np.uint64(shift)) & np.uint64(mask))
         for b, (shift, mask) in enumerate(bands(max_distance))])


def _band_records(table: pa.Table, max_distance: int) -> pa.Table:
    """One (bucket, hash) per band of each distinct hash of the part. With `phash_flips`,
    also one (bucket, hash, origin) per band of each distinct other orientation of an
    image (`_origin`: its own pHash); the hashes themselves have origin = hash."""
    h = np.unique(_hashes(table, PHASH))
    nbands = len(bands(max_distance))
    records = {BUCKET: pa.array(_band_keys(h, max_distance), pa.uint64()),
               PHASH: pa.array(np.tile(h, nbands), pa.uint64())}
    if PHASH_FLIPS not in table.column_names:
        return pa.table(records)
    turned, origin = _orientations(table)
    records[ORIGIN] = records[PHASH]
    return pa.concat_tables([pa.table(records), pa.table({
        BUCKET: pa.array(_band_keys(turned, max_distance), pa.uint64()),
        PHASH: pa.array(np.tile(turned, nbands), pa.uint64()),
        ORIGIN: pa.array(np.tile(origin, nbands), pa.uint64())})])


def _orientations(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """(hash of another orientation, pHash of the image) pairs of the rows, the
    orientation's hash differing from the image's: all 7 where a row has its
    `phash_flips`, the transpose alone where it has not. Rows repeating the pHash and
    flips of the row before them (in pHash order) add nothing; other repeats add
    duplicate pairs, which only repeat edges."""
    h = _hashes(table, PHASH)
    flips = table[PHASH_FLIPS].combine_chunks() if table.num_rows else None
    has = (pc.is_valid(flips).to_numpy(zero_copy_only=False) if flips is not None
           else np.zeros(0, bool))
    f = (flips.flatten().to_numpy().reshape(-1, 3) if has.any()
         else np.empty((0, 3), np.uint64))
    h_full = h[has]
    order = np.argsort(h_full)
    h_full, f = h_full[order], f[order]
    if h_full.size:
        new = np.r_[True, (h_full[1:] != h_full[:-1]) | (f[1:] != f[:-1]).any(axis=1)]
        h_full, f = h_full[new], f[new]
    plain = np.unique(h[~has])
    turned = np.concatenate([dihedral_hashes(h_full, f)[:, 1:].ravel(), transpose_bits(plain)])
    origin = np.concatenate([np.repeat(h_full, 7), plain])
    other = turned != origin
    return turned[other], origin[other]


def _runs(bucket: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and sizes of the runs of equal values of a sorted array."""
    if not bucket.size:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    starts = np.flatnonzero(np.r_[True, bucket[1:] != bucket[:-1]])
    return starts, np.diff(np.r_[starts, bucket.size]).astype(np.int64)


def _first_band(x: np.ndarray, band_masks: list[tuple[int, int]]) -> np.ndarray:
    """Index of the first band where x (two hashes xor-ed) is zero (len(bands) if none)."""
    first = np.full(x.size, len(band_masks), dtype=np.int64)
    for b in range(len(band_masks) - 1, -1, -1):
        shift, mask = band_masks[b]
        first[((x >> np.uint64(shift)) & np.uint64(mask)) == 0] = b
    return first


def _bucket_edges(table: pa.Table, max_distance: int) -> pa.Table:
    """Pairs within max_distance among the hashes of each bucket here. A pair is kept only
    in the bucket of the first band its hashes agree on, so each edge comes out once.
    Records of other orientations (`_origin` set and not their own hash) are compared
    with the hashes of their bucket: (origin, hash) is an edge where they are close."""
    bucket, h = _hashes(table, BUCKET), _hashes(table, PHASH)
    turned = None
    if ORIGIN in table.column_names and h.size:
        origin = _hashes(table, ORIGIN)
        other = origin != h
        turned = (bucket[other], h[other], origin[other])
        bucket, h = bucket[~other], h[~other]
    order = np.lexsort((h, bucket))
    bucket, h = bucket[order], h[order]
    if h.size:
        new = np.r_[True, (bucket[1:] != bucket[:-1]) | (h[1:] != h[:-1])]
        bucket, h = bucket[new], h[new]
    starts, sizes = _runs(bucket)
    band_masks = bands(max_distance)
    us, vs = [np.empty(0, np.uint64)], [np.empty(0, np.uint64)]

    def emit(i: np.ndarray, j: np.ndarray) -> None:
        first = _first_band(h[i] ^ h[j], band_masks)
        mine = first == (bucket[i] >> np.uint64(32)).astype(np.int64)
        us.append(h[i[mine]])  # h is sorted within a bucket: h[i] < h[j]
        vs.append(h[j[mine]])

    small = (sizes >= 2) & (sizes <= SMALL_BUCKET)
    for i, j in _close_pairs(h, starts[small], sizes[small], max_distance):
        emit(i, j)
    for start, size in zip(starts[sizes > SMALL_BUCKET], sizes[sizes > SMALL_BUCKET]):
        i, j = _hamming_pairs(h[start:start + size], max_distance)
        emit(i + start, j + start)
    if turned is not None:
        for u, v in _turned_edges(*turned, bucket, h, starts, sizes, max_distance):
            us.append(u)
            vs.append(v)
    return pa.table({"u": pa.array(np.concatenate(us), pa.uint64()),
                     "v": pa.array(np.concatenate(vs), pa.uint64())})


def _turned_edges(t_bucket: np.ndarray, t_hash: np.ndarray, t_origin: np.ndarray,
                  bucket: np.ndarray, h: np.ndarray, starts: np.ndarray, sizes: np.ndarray,
                  max_distance: int):
    """Edges (origin, hash) for each record of another orientation (t_*) and each hash of
    its bucket (`bucket`, `h`: sorted and distinct, in runs `starts`, `sizes`) within
    max_distance of it, kept in the first band where the two agree (a pair of hashes
    meets in several buckets) and where the hash is not the record's own image's."""
    cells = PAIR_CELLS
    order = np.argsort(t_bucket)  # repeated records only repeat edges
    t_bucket, t_hash, t_origin = t_bucket[order], t_hash[order], t_origin[order]
    t_starts, t_sizes = _runs(t_bucket)
    if not t_starts.size or not starts.size:
        return
    # the run of hashes in the bucket of each run of turned records
    at = np.minimum(np.searchsorted(bucket[starts], t_bucket[t_starts]), starts.size - 1)
    found = bucket[starts[at]] == t_bucket[t_starts]
    q_starts, q_sizes = t_starts[found], t_sizes[found]
    b_starts, b_sizes = starts[at[found]], sizes[at[found]]
    band_masks = bands(max_distance)

    def edges(i: np.ndarray, j: np.ndarray):
        x = t_hash[i] ^ h[j]
        mine = (_first_band(x, band_masks) == (bucket[j] >> np.uint64(32)).astype(np.int64))
        mine &= t_origin[i] != h[j]
        return t_origin[i[mine]], h[j[mine]]

    large = (b_sizes > SMALL_BUCKET) | (q_sizes * b_sizes > cells)
    for qs, qn, bs, bn in zip(q_starts[large], q_sizes[large], b_starts[large],
                              b_sizes[large]):
        i, j = _hamming_pairs(h[bs:bs + bn], max_distance, t_hash[qs:qs + qn])
        yield edges(i + qs, j + bs)
    for i, j in _cross_pairs(t_hash, q_starts[~large], q_sizes[~large], h, b_starts[~large],
                             b_sizes[~large], max_distance, cells):
        yield edges(i, j)


def _padded_width(sizes: np.ndarray) -> np.ndarray:
    """Widths runs are padded to: powers of two up to 64, then multiples of 64."""
    power = 2 ** np.ceil(np.log2(np.maximum(sizes, 1))).astype(np.int64)
    return np.where(sizes > 64, -(-sizes // 64) * 64, power)


def _cross_pairs(q: np.ndarray, q_starts: np.ndarray, q_sizes: np.ndarray, b: np.ndarray,
                 b_starts: np.ndarray, b_sizes: np.ndarray, max_distance: int,
                 cells: int = PAIR_CELLS):
    """Index pairs (i, j) with q[i] within max_distance bits of b[j], i in the k-th run of
    q (q_starts, q_sizes) and j in the k-th run of b. Runs of about the same sizes are
    padded (repeating their last value) to the same widths and compared as a stack of
    rectangles, `cells` cells at a time; hits in the padding are dropped."""
    wq, wb = _padded_width(q_sizes), _padded_width(b_sizes)
    for width_q, width_b in sorted(set(zip(wq.tolist(), wb.tolist()))):
        mine = (wq == width_q) & (wb == width_b)
        qs, qn, bs, bn = q_starts[mine], q_sizes[mine], b_starts[mine], b_sizes[mine]
        step = max(1, cells // (width_q * width_b))
        for lo in range(0, qs.size, step):
            sl = slice(lo, lo + step)
            qi = qs[sl, None] + np.minimum(np.arange(width_q)[None, :], qn[sl, None] - 1)
            bi = bs[sl, None] + np.minimum(np.arange(width_b)[None, :], bn[sl, None] - 1)
            near = np.bitwise_count(q[qi][:, :, None] ^ b[bi][:, None, :]) <= max_distance
            hit = np.flatnonzero(near)
            run, cell = np.divmod(hit, width_q * width_b)
            x, y = np.divmod(cell, width_b)
            real = (x < qn[sl][run]) & (y < bn[sl][run])
            yield qi[run, x][real], bi[run, y][real]


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


def _hamming_pairs(unique: np.ndarray, max_distance: int,
                   queries: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i, j), i < j, of distinct uint64 hashes within max_distance bits, by
    faiss's multi-index hashing (probes only the buckets that can hold a match). With
    `queries`: every pair (i, j) of queries[i] and unique[j] within max_distance."""
    import faiss

    def as_codes(h: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(h.astype(">u8").view(np.uint8).reshape(h.size, 8))

    m = unique.size
    codes = as_codes(unique)
    asked = codes if queries is None else as_codes(queries)
    nhash, nflip = _multihash_plan(m, max_distance)
    index = faiss.IndexBinaryMultiHash(64, nhash, 64 // nhash)
    index.nflip = nflip
    index.add(codes)
    rows, cols = [np.empty(0, np.int64)], [np.empty(0, np.int64)]
    chunk = 262_144  # bounds the result buffers of one range_search call
    for start in range(0, len(asked), chunk):
        lims, _, found = index.range_search(asked[start:start + chunk], max_distance + 1)
        counts = np.diff(lims.astype(np.int64))
        query = np.repeat(np.arange(start, start + counts.size), counts)
        keep = found > query if queries is None else np.ones(found.size, bool)
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


class PhashDedup(RowStage, GlobalStage):
    """Mark near-duplicate images: 64-bit perceptual hashes within max_distance bits.

    With `invariance: dihedral`, an image's mirror images and 90/180/270 degree turns are
    its near-duplicates too: the distance is the least over its 8 orientations."""

    type = "phash_dedup"
    Params = PhashParams
    params: PhashParams
    verdict_column = "phash_duplicate_of"
    verdict_prefix = "near-duplicate of "
    marks_duplicates = True

    @property
    def dihedral(self) -> bool:
        return self.params.invariance == "dihedral"

    def reads(self) -> tuple[str, ...]:
        return ("sample_id", *_policy_columns(self.params))

    def writes(self) -> dict[str, pa.DataType]:
        flips = {PHASH_FLIPS: pa.list_(pa.uint64(), 3)} if self.dihedral else {}
        return {"phash": pa.uint64(), **flips, "phash_duplicate_of": pa.string()}

    def needs_pixels(self) -> bool:
        return True

    def pair_columns(self) -> tuple[str, ...]:
        return (PHASH, PHASH_FLIPS) if self.dihedral else (PHASH,)

    def pair_limit(self) -> float:
        return float(self.params.max_distance)

    def pair_distances(self, rows: pa.Table, kept: pa.Table) -> np.ndarray:
        """Hamming distance of the pHashes (dihedral: the least over the row's 8
        orientations; a row stored without its flips is compared as it is and transposed,
        as the dedup compared it)."""
        missing = (pc.is_null(rows[PHASH]).to_numpy(zero_copy_only=False)
                   | pc.is_null(kept[PHASH]).to_numpy(zero_copy_only=False))
        a = pc.fill_null(rows[PHASH], 0).to_numpy().astype(np.uint64)
        b = pc.fill_null(kept[PHASH], 0).to_numpy().astype(np.uint64)
        orientations = a[:, None]
        if self.dihedral and PHASH_FLIPS in rows.column_names and len(a):
            flips = rows[PHASH_FLIPS].combine_chunks()
            has = pc.is_valid(flips).to_numpy(zero_copy_only=False)
            f = np.zeros((len(a), 3), np.uint64)
            if has.any():
                f[has] = flips.filter(pa.array(has)).flatten().to_numpy().reshape(-1, 3)
            orientations = dihedral_hashes(a, f)
            as_is_and_transposed = np.column_stack([a, transpose_bits(a)])
            orientations[~has] = np.repeat(as_is_and_transposed[~has], 4, axis=1)
        distance = np.bitwise_count(orientations ^ b[:, None]).min(axis=1).astype(np.float64)
        distance[missing] = np.nan
        return distance

    def row_fingerprint(self) -> dict:
        fingerprint = {"type": self.type, "bits": 64, "reducing_gap": PHASH_REDUCING_GAP}
        if self.dihedral:  # rows gain phash_flips; without it, earlier tables stay current
            fingerprint["invariance"] = self.params.invariance
        return fingerprint

    def process(self, batch: pa.Table, images: list) -> dict[str, pa.Array]:
        has = np.array([img is not None for img in images], dtype=bool)
        blocks = np.array([phash_block(img) for img in images if img is not None],
                          dtype=np.float64).reshape(-1, 8, 8)
        values = np.zeros(len(images), np.uint64)
        values[has] = hash_bits(blocks)
        out = {"phash": pa.array(values, pa.uint64(), mask=~has)}
        if self.dihedral:
            flips = np.zeros((len(images), 3), np.uint64)
            flips[has] = flip_hashes(blocks)
            out[PHASH_FLIPS] = pa.FixedSizeListArray.from_arrays(
                pa.array(flips.ravel(), pa.uint64()), 3, mask=pa.array(~has))
        return out

    def global_part(self, ex) -> GlobalResult:
        """Distinct hashes are the vertices; edges join hashes within max_distance (found
        in band buckets; with dihedral invariance, also a hash and another's orientations
        within max_distance of it); a group is a connected component (large-star /
        small-star rounds), and the keep policy picks one row per group."""
        from curate.algos.components import connected_components

        distance = self.params.max_distance
        flips = [PHASH_FLIPS] if self.dihedral else []
        rows = ex.scan(["sample_id", PHASH, *flips, *_policy_columns(self.params)],
                       _with_phash)
        labels: list = []
        self.report = {}
        if distance > 0 or self.dihedral:
            found = connected_components(ex, near_pairs(ex, rows, distance),
                                         vertex=PHASH, component=COMPONENT)
            labels = found.labels
            self.report = {"near_pairs": found.edges, "rounds": found.rounds}
        if flips:  # not needed past the search
            rows = ex.map(rows, _without, PHASH_FLIPS)
        joined = ex.shuffle(rows + labels, PHASH, _attach_components)
        parts = ex.map(joined, _unlinked_duplicates, self.params)
        if labels:
            linked = ex.map(joined, _linked_rows)
            parts += ex.shuffle(linked, COMPONENT, _component_duplicates, self.params)
        return GlobalResult(parts, pa.schema([(PHASH_VERDICT, pa.string())]))


def _without(table: pa.Table, column: str) -> pa.Table:
    return table.drop_columns([column]) if column in table.column_names else table
