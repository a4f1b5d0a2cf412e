"""Stages called directly on Arrow batches: no Ray."""

from __future__ import annotations

import http.server
import io
import tarfile
import threading
import time
from typing import ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageFilter

from curate.errors import RunError
from curate.stages import ExactDedup, ImageQuality, IngestImages, PhashDedup
from curate.stages.image.ingest_images import sample_id_for

from .helpers import hamming_groups


@pytest.fixture(scope="module")
def coffee() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.coffee())


def jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def ingest(paths, **kwargs):
    stage = IngestImages(paths=[str(p) for p in paths], **kwargs)
    return stage.load(stage.list_inputs())


# --- image_quality --------------------------------------------------------------------------


def test_quality_scores_and_reasons(coffee):
    blurred = coffee.filter(ImageFilter.GaussianBlur(6))
    dark = Image.eval(coffee, lambda v: v // 10)
    batch = pa.table({"width": [600, 600, 600, 60, None], "height": [400, 400, 400, 40, None],
                      "num_bytes": [50_000, 50_000, 50_000, 900, None]})
    images = [coffee, blurred, dark, coffee.resize((60, 40)), None]
    stage = ImageQuality(min_side=100, min_blur=50, min_brightness=30)
    out = stage.process(batch, images)
    blur = out["blur"].to_pylist()
    assert blur[0] > 10 * blur[1]  # sharp photo vs the same photo blurred
    reasons = out["quality_reason"].to_pylist()
    assert reasons[0] is None
    assert reasons[1].startswith("blur ")
    assert "brightness" in reasons[2]
    assert reasons[3].startswith("min_side 40 < 100")
    assert reasons[4] is None and out["blur"][4].as_py() is None
    assert out["aspect_ratio"][0].as_py() == pytest.approx(1.5)


def test_quality_without_thresholds_only_scores(coffee):
    out = ImageQuality().process(pa.table({"width": [600], "height": [400],
                                           "num_bytes": [1]}), [coffee])
    assert out["quality_reason"][0].as_py() is None
    assert 0 < out["saturation"][0].as_py() < 255


# --- exact_dedup ----------------------------------------------------------------------------


def dedup_table(**columns):
    n = len(next(iter(columns.values())))
    base = {"sample_id": [f"s{i}" for i in range(n)], "uri": [f"u{n - i}" for i in range(n)],
            "width": [10] * n, "height": [10] * n, "num_bytes": [100] * n}
    base.update(columns)
    return pa.table(base)


def _scores_by_the_definition(img: Image.Image) -> tuple[float, float, float, float]:
    """The quality scores as first written: float32 arrays and a whole HSV image."""
    gray = np.asarray(img.convert("L"), dtype=np.float32)
    blur = 0.0
    if gray.shape[0] >= 3 and gray.shape[1] >= 3:
        blur = float((gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1]
                      - 4.0 * gray[1:-1, 1:-1]).var())
    saturation = float(np.asarray(img.convert("HSV"), dtype=np.uint8)[..., 1].mean())
    return blur, float(gray.mean()), float(gray.std()), saturation


def test_fast_quality_scores_and_phash_agree_with_their_definitions():
    """Blur, brightness and contrast within 1e-5 (relative) of float32 arithmetic on whole
    images; saturation exact under 384 px and within 1% (or 0.5 of 255) from its grid of
    pixels above; the pHash within 4 bits of imagehash.phash on the whole image, exact
    under 128 px, and on average under one bit off over photos."""
    import imagehash

    from curate.media.decode import luma
    from curate.media.samples import base_photos, photo_like
    from curate.stages.image.image_quality import SAMPLE_FROM, image_scores
    from curate.stages.table.phash_dedup import phash_value

    rng = np.random.default_rng(0)
    bases = base_photos()
    images = [photo_like(rng, bases, size) for size in ((1024, 768), (333, 517), (64, 64))]
    images += [photo_like(rng, bases, (800, 600)) for _ in range(24)]
    images += [base.convert("RGB") for base in bases]
    images += [Image.new("RGB", (40, 30), (200, 10, 10)), Image.new("RGB", (2, 2), (0, 0, 0)),
               Image.fromarray(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8)),
               Image.fromarray(rng.integers(0, 256, (500, 700, 3), dtype=np.uint8))]
    bits_off = []
    for img in images:
        fast, reference = image_scores(img), _scores_by_the_definition(img)
        assert fast[:3] == pytest.approx(reference[:3], rel=1e-5, abs=1e-4), img.size
        if min(img.size) < SAMPLE_FROM:
            assert fast[3] == pytest.approx(reference[3], abs=1e-9), img.size
        else:
            assert abs(fast[3] - reference[3]) <= max(0.01 * reference[3], 0.5), img.size
        expected = imagehash.phash(img, hash_size=8).hash.flatten()
        off = bin(phash_value(img) ^ int.from_bytes(np.packbits(expected).tobytes(),
                                                    "big")).count("1")
        assert off <= 4, img.size
        if max(img.size) < 128:
            assert off == 0, img.size
        bits_off.append(off)
        assert luma(img) is luma(img)  # converted once
    assert np.mean(bits_off) < 1.0


def test_exact_dedup_keeps_one_per_hash_by_policy():
    table = dedup_table(content_hash=["a", "b", "a", "a", None],
                        width=[10, 10, 30, 20, 10], height=[10] * 5,
                        score=[0.1, 0.2, 0.3, 0.9, 0.5])
    alive = pa.array([True] * 5)
    largest = ExactDedup().run_global(table, alive)["exact_duplicate_of"].to_pylist()
    assert largest == ["s2", None, None, "s2", None]
    best = ExactDedup(keep="highest", score_column="score").run_global(table, alive)
    assert best["exact_duplicate_of"].to_pylist() == ["s3", None, "s3", None, None]
    first = ExactDedup(keep="first").run_global(table, alive)  # uri order: s3 < s2 < s0
    assert first["exact_duplicate_of"].to_pylist() == ["s3", None, "s3", None, None]


def test_exact_dedup_ignores_rows_dropped_earlier():
    table = dedup_table(content_hash=["a", "a", "a"], width=[50, 10, 10])
    alive = pa.array([False, True, True])
    out = ExactDedup().run_global(table, alive)["exact_duplicate_of"].to_pylist()
    assert out[0] is None and sorted(x for x in out if x) == ["s1"]


# --- phash_dedup ----------------------------------------------------------------------------


def brute_force_groups(hashes: np.ndarray, max_distance: int) -> list[set[int]]:
    from scipy.sparse.csgraph import connected_components

    bits = np.unpackbits(hashes.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)
    dist = (bits[:, None, :] != bits[None, :, :]).sum(-1)
    _, labels = connected_components(dist <= max_distance, directed=False)
    return partition(labels)


def partition(labels) -> list[set[int]]:
    groups: dict[int, set[int]] = {}
    for i, label in enumerate(labels):
        groups.setdefault(int(label), set()).add(i)
    return sorted((g for g in groups.values()), key=min)


@pytest.mark.parametrize("max_distance", [0, 3, 6, 10, 16])
def test_hamming_groups_match_brute_force(max_distance):
    rng = np.random.default_rng(max_distance)
    centres = rng.integers(0, 2**63, size=60, dtype=np.uint64) * np.uint64(2)
    hashes = []
    for c in centres:
        for _ in range(int(rng.integers(1, 4))):
            flips = rng.choice(64, int(rng.integers(0, 14)), replace=False)
            v = int(c)
            for f in flips:
                v ^= 1 << int(f)
            hashes.append(v)
    hashes.append(hashes[0])  # an exact repeat
    h = np.array(hashes, dtype=np.uint64)
    assert partition(hamming_groups(h, max_distance)) == brute_force_groups(h, max_distance)


def test_phash_dedup_finds_edited_copies(coffee):
    import skimage.data

    other = Image.fromarray(skimage.data.astronaut())
    images = [coffee, coffee.resize((300, 200)), Image.open(io.BytesIO(jpeg(coffee))), other]
    stage = PhashDedup(max_distance=6)
    hashes = stage.process(pa.table({"x": [1] * 4}), images)["phash"]
    table = dedup_table(phash=hashes, width=[600, 300, 600, 512], height=[400, 200, 400, 512],
                        num_bytes=[9, 1, 5, 9])
    out = stage.run_global(table, pa.array([True] * 4))["phash_duplicate_of"].to_pylist()
    assert out == [None, "s0", "s0", None]


# --- ingest_images: listing and reading --------------------------------------------------


def test_directories_globs_and_one_row_per_file(tmp_path, coffee):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.jpg").write_bytes(jpeg(coffee))
    (tmp_path / "a" / "b" / "y.png").write_bytes(jpeg(coffee))  # mislabelled
    (tmp_path / "a" / ".hidden.jpg").write_bytes(b"skip me")
    (tmp_path / "a" / "b" / "notes.txt").write_text("not an image")
    table, images = ingest([tmp_path / "a", str(tmp_path / "a" / "*.jpg")])
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in table.to_pylist()}
    assert sorted(rows) == ["notes.txt", "x.jpg", "y.png"]  # x.jpg once, though listed twice
    assert rows["y.png"]["format"] == "JPEG" and rows["y.png"]["error"] is None
    assert rows["notes.txt"]["error"].startswith("not_an_image")
    assert rows["x.jpg"]["content_hash"] == rows["y.png"]["content_hash"]
    assert rows["x.jpg"]["sample_id"] == sample_id_for(rows["x.jpg"]["uri"])
    assert sum(img is not None for img in images) == 2


def test_missing_paths_fail_before_work(tmp_path):
    with pytest.raises(RunError, match=r"paths.0: .* does not exist"):
        IngestImages(paths=[str(tmp_path / "nope")]).list_inputs()
    with pytest.raises(RunError, match="matches no files"):
        IngestImages(paths=[str(tmp_path / "*.jpg")]).list_inputs()


@pytest.mark.parametrize("kind", ["csv", "parquet", "jsonl"])
def test_manifests_with_relative_paths_and_captions(tmp_path, coffee, kind):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "c.jpg").write_bytes(jpeg(coffee))
    manifest = pa.table({"uri": ["img/c.jpg", "img/missing.jpg", None],
                         "caption": ["a coffee cup", "gone", "no uri"]})
    path = tmp_path / f"list.{kind}"
    if kind == "csv":
        import pyarrow.csv as pcsv

        pcsv.write_csv(manifest, path)
    elif kind == "parquet":
        pq.write_table(manifest, path)
    else:
        import json

        path.write_text("\n".join(json.dumps(r) for r in manifest.to_pylist()))
    table, _ = ingest([path])
    rows = {r["alt_text"]: r for r in table.to_pylist()}
    assert rows["a coffee cup"]["error"] is None and rows["a coffee cup"]["width"] == 600
    assert rows["gone"]["error"].startswith("missing")
    assert rows["no uri"]["error"].startswith("missing_uri")


def test_manifest_without_uri_column_is_a_clear_error(tmp_path):
    path = tmp_path / "m.csv"
    path.write_text("path,caption\na.jpg,x\n")
    with pytest.raises(RunError, match=r"no column 'uri'.*columns: path, caption"):
        IngestImages(paths=[str(path)]).list_inputs()
    assert IngestImages(paths=[str(path)], uri_column="path").list_inputs().num_rows == 1


def test_webdataset_shard(tmp_path, coffee):
    shard = tmp_path / "shard-0.tar"
    with tarfile.open(shard, "w") as tar:
        for name, payload in (("k1.jpg", jpeg(coffee)), ("k1.txt", b"caption one"),
                              ("k2.json", b"{}"), ("sub/k3.png", jpeg(coffee))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    table, _images = ingest([shard])
    rows = {r["uri"].split("#", 1)[1]: r for r in table.to_pylist()}
    assert rows["k1.jpg"]["alt_text"] == "caption one" and rows["k1.jpg"]["width"] == 600
    assert rows["k2"]["error"].startswith("not_an_image")
    assert rows["sub/k3.png"]["format"] == "JPEG"
    broken = tmp_path / "broken.tar"
    broken.write_bytes(b"\x00garbage" * 100)
    table, _ = ingest([broken])
    assert table["error"][0].as_py().startswith("unreadable")


class _Handler(http.server.BaseHTTPRequestHandler):
    payload = b""
    failures: ClassVar[dict[str, int]] = {}

    def do_GET(self):
        if self.path == "/ok.jpg":
            self._send(200, self.payload)
        elif self.path == "/flaky.jpg":
            left = self.failures.get("flaky", 1)
            self.failures["flaky"] = left - 1
            self._send(503, b"busy") if left > 0 else self._send(200, self.payload)
        elif self.path == "/slow.jpg":
            time.sleep(1.5)
            self._send(200, self.payload)
        elif self.path == "/big.jpg":
            self._send(200, b"x" * 300_000)
        else:
            self._send(404, b"not found")

    def _send(self, code, body):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the client gave up (timeout test): expected
            pass

    def log_message(self, *args):
        pass


def test_http_urls_timeouts_retries_and_size_cap(tmp_path, coffee):
    _Handler.payload = jpeg(coffee)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        manifest = tmp_path / "urls.csv"
        names = ["ok.jpg", "flaky.jpg", "slow.jpg", "big.jpg", "gone.jpg"]
        manifest.write_text("uri\n" + "".join(f"{base}/{n}\n" for n in names))
        table, _ = ingest([manifest], http_timeout_s=0.5, http_retries=1, max_bytes=200_000)
    finally:
        server.shutdown()
    rows = {r["uri"].rsplit("/", 1)[1]: r for r in table.to_pylist()}
    assert rows["ok.jpg"]["error"] is None and rows["ok.jpg"]["width"] == 600
    assert rows["flaky.jpg"]["error"] is None  # one 503, then served on the retry
    assert rows["slow.jpg"]["error"].startswith("http_timeout")
    assert rows["big.jpg"]["error"].startswith("too_large")
    assert rows["gone.jpg"]["error"].startswith("http_status: HTTP 404")
