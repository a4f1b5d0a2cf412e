"""Whole `curate run` (ingest + image_quality + exact_dedup + phash_dedup, start-up
included) against a plain single-process loop doing the same work with the same libraries.

    python benchmarks/ingest_filter_dedup.py --images 5000

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import run_curate, throughput  # noqa: E402

THRESHOLDS = {"min_side": 128, "min_blur": 10.0, "min_brightness": 15.0}
MAX_DISTANCE = 6


def baseline_loop(paths: list[Path], out: Path) -> None:
    """What one would write by hand: read, hash, decode, score, pHash; then dedup."""
    import imagehash
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for path in paths:
        data = path.read_bytes()
        row = {"uri": str(path), "num_bytes": len(data),
               "content_hash": hashlib.sha256(data).hexdigest(), "error": None}
        try:
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            img.draft("RGB", (1024, 1024))
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((1024, 1024), Image.Resampling.BILINEAR)
        except Exception as exc:
            row["error"] = str(exc)
            rows.append(row)
            continue
        gray = np.asarray(img.convert("L"), dtype=np.float32)
        lap = (gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1]
               - 4 * gray[1:-1, 1:-1])
        sat = np.asarray(img.convert("HSV"))[..., 1].mean()
        bits = imagehash.phash(img).hash.flatten()
        row.update(width=width, height=height, blur=float(lap.var()),
                   brightness=float(gray.mean()), contrast=float(gray.std()),
                   saturation=float(sat),
                   phash=int.from_bytes(np.packbits(bits).tobytes(), "big"))
        row["keep"] = (min(width, height) >= THRESHOLDS["min_side"]
                       and row["blur"] >= THRESHOLDS["min_blur"]
                       and row["brightness"] >= THRESHOLDS["min_brightness"])
        rows.append(row)
    seen: dict[str, int] = {}
    for i, row in enumerate(rows):
        if row.get("keep"):
            if row["content_hash"] in seen:
                row["keep"] = False
            else:
                seen[row["content_hash"]] = i
    alive = [i for i, r in enumerate(rows) if r.get("keep")]
    codes = np.array([rows[i]["phash"] for i in alive], dtype=np.uint64)
    bits = np.unpackbits(codes.astype(">u8").view(np.uint8).reshape(-1, 8), axis=1)
    for start in range(0, len(alive), 512):  # all pairs, vectorised in blocks
        block = bits[start:start + 512]
        dist = (block[:, None, :] != bits[None, :, :]).sum(-1)
        for a, b in zip(*np.nonzero(dist <= MAX_DISTANCE)):
            if start + a > b:
                rows[alive[start + a]]["keep"] = False
    for row in rows:
        row["phash"] = str(row.get("phash"))  # uint64 above int64's range; kept as text
    pq.write_table(pa.Table.from_pylist(rows), out)


def run_pipeline(media: Path, store: Path, workdir: Path) -> tuple[float, float, dict]:
    config = {
        "name": "bench",
        "store": {"uri": str(store)},
        "stages": [
            {"type": "ingest_images", "paths": [str(media)]},
            {"type": "image_quality", **THRESHOLDS},
            {"type": "exact_dedup"},
            {"type": "phash_dedup", "max_distance": MAX_DISTANCE},
        ],
    }
    return run_curate(config, workdir, store.name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    from curate.media.samples import write_photos

    width, height = (int(x) for x in args.size.split("x"))
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-bench-"))
    media, small = workdir / "photos", workdir / "startup_photos"
    t = time.perf_counter()
    paths = sorted(media.glob("*.jpg")) if media.exists() else []
    if len(paths) != args.images:
        paths = write_photos(media, args.images, size=(width, height), seed=0)
    write_photos(small, 16, size=(width, height), seed=1)
    print(f"inputs: {len(paths)} JPEGs of {width}x{height} "
          f"({sum(p.stat().st_size for p in paths) / 1e6:.0f} MB) in {workdir} "
          f"[{time.perf_counter() - t:.0f} s to make]", flush=True)

    rss0 = psutil.Process().memory_info().rss
    t = time.perf_counter()
    baseline_loop(paths, workdir / "baseline.parquet")
    loop_s = time.perf_counter() - t
    loop_rss = max(psutil.Process().memory_info().rss - rss0, 0) / 1e6
    print(f"plain loop: {loop_s:.1f} s, {len(paths) / loop_s:.1f} images/s", flush=True)

    startup_s, _, _ = run_pipeline(small, workdir / "store_startup", workdir)
    print(f"curate run on 16 images (fixed start-up): {startup_s:.1f} s", flush=True)
    run_s, peak_mb, summary = run_pipeline(media, workdir / "store", workdir)
    print(f"curate run: {run_s:.1f} s, {len(paths) / run_s:.1f} images/s, "
          f"{summary['selected']} selected", flush=True)
    result = {
        "images": len(paths),
        "image_size": f"{width}x{height}",
        "cpus": os.cpu_count(),
        **throughput("images", len(paths), run_s, loop_s, startup_s, peak_mb),
        "loop_rss_growth_mb": round(loop_rss, 1),
        "selected": summary["selected"],
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
