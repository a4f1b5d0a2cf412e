"""phash_dedup with `invariance: dihedral`: a photo's mirror images and 90/180/270 degree
turns are its near-duplicates. The 8 orientations' hashes come from the one DCT the pHash
takes; checked against imagehash on the turned pixels, and the band-bucket search against
all pairs."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curate import load_config
from curate.engine.tasks import concat
from curate.errors import ConfigError
from curate.parts import MemoryExecutor
from curate.stages.table.phash_dedup import (
    PHASH_FLIPS,
    PhashDedup,
    dihedral_hashes,
    flip_hashes,
    hash_bits,
    near_pairs,
    phash_block,
    phash_value,
    transpose_bits,
)

from .conftest import DEMO_MEDIA
from .helpers import hamming_groups

#: The PIL transposes of an image whose pHashes `dihedral_hashes` returns, in its order.
DIHEDRAL = ("identity", "FLIP_LEFT_RIGHT", "FLIP_TOP_BOTTOM", "ROTATE_180",
            "TRANSPOSE", "ROTATE_90", "ROTATE_270", "TRANSVERSE")
TURNS = [None if name == "identity" else Image.Transpose[name] for name in DIHEDRAL]


def dihedral_distance(a: int, a_flips, b: int, b_flips) -> int:
    """Least Hamming distance between one image's pHash and the other's in any of the 8
    orientations, either way round (the distance `invariance: dihedral` groups by)."""
    va = dihedral_hashes(np.array([a], np.uint64), np.array([a_flips], np.uint64))[0]
    vb = dihedral_hashes(np.array([b], np.uint64), np.array([b_flips], np.uint64))[0]
    return int(min(np.bitwise_count(va ^ np.uint64(b)).min(),
                   np.bitwise_count(vb ^ np.uint64(a)).min()))


PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera")
#: Real photos unrelated to PHOTOS and to each other.
UNRELATED = ("horse", "moon", "page", "text", "coins", "brick", "gravel", "grass")


def skimage_photo(name: str, side: int = 256) -> Image.Image:
    import skimage.data

    img = Image.fromarray(getattr(skimage.data, name)()).convert("RGB")
    scale = side / max(img.size)
    return img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                      Image.Resampling.BILINEAR)


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Real photos: scikit-image's and scikit-learn's samples (china, flower: the copies in
    examples/media, read faster than importing scikit-learn)."""
    sample = [Image.open(DEMO_MEDIA / "photos" / f"{name}.jpg").convert("RGB")
              for name in ("china", "flower")]
    return [skimage_photo(name) for name in PHOTOS] + [
        img.resize((256, round(256 * img.height / img.width))) for img in sample]


def turned(img: Image.Image, turn) -> Image.Image:
    return img if turn is None else img.transpose(turn)


def imagehash_value(img: Image.Image) -> int:
    """The oracle: imagehash's own pHash of the pixels, as an integer."""
    import imagehash

    return int.from_bytes(np.packbits(imagehash.phash(img).hash.flatten()).tobytes(), "big")


def orientations(img: Image.Image) -> np.ndarray:
    """The 8 hashes this stage derives from one image's DCT."""
    return dihedral_hashes(np.array([phash_value(img)], np.uint64),
                           flip_hashes(phash_block(img)[None]))[0]


# --- the hashes of the 8 orientations -------------------------------------------------------


def test_orientation_hashes_are_imagehash_of_the_turned_pixels(photos):
    """Where the 32x32 resize commutes with the turn (an image already 32 px on a side, or
    resized along one axis only), each derived hash is bit for bit imagehash.phash of the
    turned pixels; mirrors and 180 degree turns also where a two-pass resize is mirror
    symmetric (sides under 128 px)."""
    checked = 0
    for photo in photos:
        for size in ((32, 32), (40, 32), (32, 72)):
            img = photo.resize(size, Image.Resampling.BILINEAR)
            assert phash_value(img) == imagehash_value(img)
            derived = orientations(img)
            for k, turn in enumerate(TURNS):
                assert int(derived[k]) == imagehash_value(turned(img, turn)), (size, DIHEDRAL[k])
                checked += 1
        img = photo.resize((96, 80), Image.Resampling.BILINEAR)
        derived = orientations(img)
        for k in range(4):  # identity, left-right, top-bottom, 180 degrees
            assert int(derived[k]) == imagehash_value(turned(img, TURNS[k])), DIHEDRAL[k]
    assert checked == len(photos) * 3 * 8


def test_turned_full_size_photos_are_within_a_few_bits():
    """At a size where the box reduction divides evenly (mirrors exact), and the transposes
    within the few bits PIL's rounding between its two resize passes moves."""
    for name in PHOTOS:
        img = skimage_photo(name, 512).resize((512, 384))
        derived = orientations(img)
        for k, turn in enumerate(TURNS):
            off = int(np.bitwise_count(derived[k] ^ np.uint64(phash_value(turned(img, turn)))))
            assert off == 0 if k < 4 else off <= 4, (name, DIHEDRAL[k])


def test_transpose_bits_transposes_the_bit_matrix():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 2**64, 200, dtype=np.uint64, endpoint=False)
    bits = np.unpackbits(h.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)
    square = bits.reshape(-1, 8, 8).transpose(0, 2, 1).reshape(-1, 64)
    expected = np.packbits(square, axis=1).view(">u8").ravel()
    assert np.array_equal(transpose_bits(h), expected.astype(np.uint64))
    assert np.array_equal(transpose_bits(transpose_bits(h)), h)


def test_a_mirror_changes_the_median_so_its_hash_is_no_bit_permutation():
    """Odd-index coefficients change sign: the median moves, and the DC term keeps its
    sign (always set)."""
    block = phash_block(skimage_photo("coffee"))
    signs = np.where(np.arange(8) % 2, -1.0, 1.0)[None, :]
    mirrored = hash_bits((block * signs)[None])[0]
    assert int(flip_hashes(block[None])[0, 0]) == int(mirrored)
    assert np.median(block * signs) != np.median(block)
    assert int(mirrored) >> 63 == 1 and phash_value(skimage_photo("coffee")) >> 63 == 1


# --- the search is exact for the dihedral distance -------------------------------------------


def planted_rows(rng: np.random.Generator, bases: int) -> tuple[np.ndarray, np.ndarray]:
    """pHashes and flip hashes of random DCT blocks and of copies of them: turned in the DCT
    (signs, transpose) and with noise of several sizes, so distances straddle the limit;
    some rows repeat a pHash with other flips."""
    blocks = []
    for _ in range(bases):
        base = rng.normal(0, 1, (8, 8))
        blocks.append(base)
        for _ in range(int(rng.integers(0, 4))):
            copy = base * np.where(rng.random((2, 1)) < 0.5, -1.0, 1.0)[0] ** np.arange(8)
            copy = copy * (np.where(rng.random() < 0.5, -1.0, 1.0) ** np.arange(8))[:, None]
            copy = copy.T if rng.random() < 0.5 else copy
            blocks.append(copy + rng.normal(0, rng.choice([0.0, 0.05, 0.15, 0.3]), (8, 8)))
    blocks = np.array(blocks)
    h, flips = hash_bits(blocks), flip_hashes(blocks)
    again = rng.choice(h.size, 5, replace=False)  # same pHash, the flips of another block
    h = np.r_[h, h[again]]
    flips = np.r_[flips, flips[rng.permutation(again)]]
    return h, flips


def brute_distances(h: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """All pairs' dihedral distance, by definition: the least over one image's 8 hashes
    against the other's pHash, either way round."""
    turned = dihedral_hashes(h, flips)
    one_way = np.bitwise_count(turned[:, None, :] ^ h[None, :, None]).min(axis=2)
    return np.minimum(one_way, one_way.T)


def brute_groups(h: np.ndarray, flips: np.ndarray, d: int) -> list[set[int]]:
    from scipy.sparse.csgraph import connected_components

    return partition(connected_components(brute_distances(h, flips) <= d, directed=False)[1])


def partition(labels) -> list[set[int]]:
    groups: dict[int, set[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), set()).add(i)
    return sorted(groups.values(), key=min)


@pytest.mark.parametrize("d,small_bucket,cells", [
    (0, 1024, 1 << 22), (2, 1024, 1 << 22), (6, 1024, 1 << 22), (12, 1024, 1 << 22),
    (6, 2, 1 << 22), (6, 1024, 7), (12, 2, 7)])
def test_groups_are_the_components_of_the_dihedral_distance(d, small_bucket, cells,
                                                            monkeypatch):
    import curate.stages.table.phash_dedup as dedup

    monkeypatch.setattr(dedup, "SMALL_BUCKET", small_bucket)  # 2: large buckets via faiss
    monkeypatch.setattr(dedup, "PAIR_CELLS", cells)  # 7: a few pairs at a time
    h, flips = planted_rows(np.random.default_rng(d), 60)
    expected = brute_groups(h, flips, d)
    assert any(len(g) > 1 for g in expected)
    assert partition(hamming_groups(h, d, flips)) == expected


@pytest.mark.parametrize("cells", [1, 50, 1 << 22])
def test_cross_pairs_in_runs_of_any_sizes(cells):
    from curate.stages.table.phash_dedup import _cross_pairs

    rng = np.random.default_rng(cells)
    q_sizes, b_sizes = np.array([1, 3, 9, 70, 2, 5]), np.array([2, 1, 9, 3, 66, 5])
    q = rng.integers(0, 1 << 8, q_sizes.sum()).astype(np.uint64)
    b = rng.integers(0, 1 << 8, b_sizes.sum()).astype(np.uint64)
    q_starts, b_starts = np.r_[0, np.cumsum(q_sizes)[:-1]], np.r_[0, np.cumsum(b_sizes)[:-1]]
    got = [p for i, j in _cross_pairs(q, q_starts, q_sizes, b, b_starts, b_sizes, 2, cells)
           for p in zip(i.tolist(), j.tolist())]
    expected = [(qs + x, bs + y) for qs, qn, bs, bn in zip(q_starts, q_sizes, b_starts, b_sizes)
                for x in range(qn) for y in range(bn)
                if np.bitwise_count(q[qs + x] ^ b[bs + y]) <= 2]
    assert len(got) == len(set(got)) and set(got) == set(expected) and expected


def test_near_pairs_from_several_parts_find_every_turned_pair():
    """Rows of one pHash spread over parts (as on the cluster): every pair within the
    dihedral distance is an edge, and no other."""
    h, flips = planted_rows(np.random.default_rng(7), 50)
    d = 5
    rows = [pa.table({"phash": pa.array(h[i], pa.uint64()), PHASH_FLIPS:
                      pa.FixedSizeListArray.from_arrays(pa.array(flips[i].ravel()), 3)})
            for i in np.array_split(np.random.default_rng(1).permutation(h.size), 3)]
    ex = MemoryExecutor(pa.table({}), pa.array([], pa.bool_()))
    edges = concat(near_pairs(ex, rows, d))
    found = {tuple(sorted(e)) for e in zip(edges["u"].to_pylist(), edges["v"].to_pylist())}
    i, j = np.nonzero((brute_distances(h, flips) <= d) & (h[:, None] != h[None, :]))
    expected = {tuple(sorted((int(h[a]), int(h[b])))) for a, b in zip(i, j)}
    assert found == expected and len(expected) > 20
    a, b = i[0], j[0]
    assert dihedral_distance(h[a], flips[a], h[b], flips[b]) <= d


# --- the stage ------------------------------------------------------------------------------


def copy_of(img: Image.Image, turn, k: int) -> Image.Image:
    """A turned copy: exact pixels, or resized and re-encoded as a copy found online is."""
    out = turned(img, turn)
    if k % 2:
        out = out.resize((out.width * 3 // 4, out.height * 3 // 4), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        out.save(buf, format="JPEG", quality=80)
        out = Image.open(buf).convert("RGB")
    return out


def test_stage_groups_every_turn_of_a_photo_and_keeps_unrelated_photos_apart(photos):
    images, origin = [], []
    for i, photo in enumerate(photos):
        for k, turn in enumerate(TURNS):
            images.append(copy_of(photo, turn, k + i))
            origin.append(i)
    for j, name in enumerate(UNRELATED):
        images.append(skimage_photo(name))
        origin.append(len(photos) + j)
    n = len(images)
    table = pa.table({"sample_id": [f"s{i:03d}" for i in range(n)],
                      "uri": [f"u{i:03d}" for i in range(n)],
                      "width": pa.array([im.width for im in images], pa.int32()),
                      "height": pa.array([im.height for im in images], pa.int32()),
                      "num_bytes": pa.array([1] * n, pa.int64())})
    alive = pa.array([True] * n)
    verdicts = {}
    for invariance in ("none", "dihedral"):
        stage = PhashDedup(invariance=invariance)
        columns = stage.process(table, images)
        assert (PHASH_FLIPS in columns) == (invariance == "dihedral")
        with_hashes = table
        for name, values in columns.items():
            with_hashes = with_hashes.append_column(name, values)
        verdicts[invariance] = stage.run_global(with_hashes, alive)["phash_duplicate_of"]
    ids = table["sample_id"].to_pylist()
    kept = {s: s for s, v in zip(ids, verdicts["dihedral"].to_pylist()) if v is None}
    group = [kept.get(s) or v for s, v in zip(ids, verdicts["dihedral"].to_pylist())]
    for i in range(len(photos)):  # one kept copy for each photo and its 7 turns
        assert len({group[r] for r in range(n) if origin[r] == i}) == 1, i
    assert len(set(group)) == len(photos) + len(UNRELATED)  # nothing else joined
    plain = verdicts["none"].to_pylist()
    assert sum(v is not None for v in plain) < len(photos) * 3  # the issue: turns missed


def test_dihedral_on_examples_media_joins_only_turned_copies():
    """The demo photos and their copies, upright as ingest_images reads them, and each
    turned 90 degrees: the groups are exactly the plain pHash's, each with its turns. The
    rotated file's stored pixels (before its EXIF turn) are a near-duplicate only with
    dihedral invariance."""
    from PIL import ImageOps

    paths = sorted((DEMO_MEDIA / "photos").glob("*")) + sorted((DEMO_MEDIA / "variants").glob("*"))
    images = []
    for path in paths:
        img = Image.open(path)
        img.draft("RGB", (256, 256))
        images.append(ImageOps.exif_transpose(img).convert("RGB"))
    max_distance = PhashDedup().params.max_distance
    hashes = np.array([phash_value(img) for img in images], np.uint64)
    flips = flip_hashes(np.array([phash_block(img) for img in images]))
    base = partition(hamming_groups(hashes, max_distance))
    rotated = [img.transpose(Image.Transpose.ROTATE_90) for img in images]
    all_h = np.r_[hashes, [phash_value(img) for img in rotated]].astype(np.uint64)
    all_f = np.r_[flips, flip_hashes(np.array([phash_block(img) for img in rotated]))]
    groups = partition(hamming_groups(all_h, max_distance, all_f))
    n = len(images)
    assert groups == sorted(({*g, *(i + n for i in g)} for g in base), key=min)
    rocket = [p.name for p in paths].index("rocket.jpg")
    stored = Image.open(DEMO_MEDIA / "variants" / "rocket_exif_rotated.jpg").convert("RGB")
    h, f = phash_value(stored), flip_hashes(phash_block(stored)[None])[0]
    assert int(np.bitwise_count(np.uint64(h) ^ hashes[rocket])) > max_distance
    assert dihedral_distance(h, f, hashes[rocket], flips[rocket]) <= max_distance


# --- params, columns, fingerprint -----------------------------------------------------------


def test_invariance_is_checked_with_the_config_and_changes_the_row_fingerprint():
    raw = {"name": "t", "stages": [{"type": "ingest_images", "paths": ["x"]},
                                   {"type": "phash_dedup", "invariance": "mirror"}]}
    with pytest.raises(ConfigError) as info:
        load_config(raw)
    [(path, reason)] = info.value.problems
    assert path == "stages.1.invariance" and "dihedral" in reason
    plain, turned_ = PhashDedup(), PhashDedup(invariance="dihedral")
    assert plain.row_fingerprint() == {"type": "phash_dedup", "bits": 64, "reducing_gap": 2.0}
    assert turned_.row_fingerprint() == plain.row_fingerprint() | {"invariance": "dihedral"}
    assert PHASH_FLIPS not in plain.writes()
    assert turned_.writes()[PHASH_FLIPS] == pa.list_(pa.uint64(), 3)
    assert plain.params.invariance == "none"


def test_rows_without_an_image_get_no_hashes():
    stage = PhashDedup(invariance="dihedral")
    out = stage.process(pa.table({"x": [1, 2]}), [None, skimage_photo("coffee", 64)])
    assert out["phash"].null_count == 1 and out[PHASH_FLIPS].null_count == 1
    assert out[PHASH_FLIPS][1].as_py() == [int(v) for v in
                                           orientations(skimage_photo("coffee", 64))[1:4]]


def test_a_local_run_switches_it_on_recomputes_the_rows_and_stores_the_flips(tmp_path):
    """`run.executor: local` (no Ray): turning dihedral on changes the row fingerprint, so
    the rows are hashed again with their phash_flips (the images read again for the
    stage alone); then the turns are grouped."""
    import lance

    from curate.pipeline import Pipeline

    media = tmp_path / "media"
    media.mkdir()
    for name in ("coffee", "rocket"):
        img = skimage_photo(name, 128)
        img.save(media / f"{name}.png")
        img.transpose(Image.Transpose.ROTATE_90).save(media / f"{name}_turned.png")

    def run(invariance: str):
        return Pipeline.from_config(load_config({
            "name": "t", "store": {"uri": str(tmp_path / "store")},
            "run": {"executor": "local"},
            "stages": [{"type": "ingest_images", "paths": [str(media)]},
                       {"type": "phash_dedup", "invariance": invariance}]})).run(progress=False)

    assert run("none").stages[-1].kept == 4
    summary = run("dihedral")
    assert summary.rows_processed == 0 and summary.stages[-1].rows_computed == 4
    assert summary.stages[-1].kept == 2
    rows = lance.dataset(str(tmp_path / "store" / "samples.lance")).to_table().sort_by("uri")
    assert rows.schema.field(PHASH_FLIPS).type == pa.list_(pa.uint64(), 3)
    assert rows[PHASH_FLIPS].null_count == 0
    assert rows["phash_duplicate_of"].to_pylist().count(None) == 2
