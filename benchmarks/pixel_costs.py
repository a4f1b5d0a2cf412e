"""Per-image cost of the pixel stages against the decode they follow: decoding (as
ingest_images decodes), image_quality's scores and phash_dedup's hash, in one process, on
photo-like JPEGs; and the same scores computed by their definitions (float32 arrays of the
whole image, a whole HSV image, imagehash converting again) as the baseline.

    python benchmarks/pixel_costs.py --images 200 --size 1024x768

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def by_definition(img):
    """image_quality's scores and the pHash as first written (the baseline)."""
    import imagehash

    gray = np.asarray(img.convert("L"), dtype=np.float32)
    lap = (gray[1:-1, :-2] + gray[1:-1, 2:] + gray[:-2, 1:-1] + gray[2:, 1:-1]
           - 4.0 * gray[1:-1, 1:-1])
    saturation = np.asarray(img.convert("HSV"), dtype=np.uint8)[..., 1].mean()
    return (float(lap.var()), float(gray.mean()), float(gray.std()), float(saturation),
            imagehash.phash(img, hash_size=8))


def ms_per_image(fn, items, repeats: int = 3) -> float:
    """Best of `repeats` passes, milliseconds per item."""
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        for item in items:
            fn(item)
        best = min(best, time.perf_counter() - started)
    return best / len(items) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", default="1024x768")
    args = parser.parse_args()
    from curate.media.decode import decode_image
    from curate.media.samples import write_photos
    from curate.stages.image.image_quality import image_scores
    from curate.stages.table.phash_dedup import phash_value

    width, height = (int(x) for x in args.size.split("x"))
    folder = Path(tempfile.mkdtemp(prefix="curate-pixels-"))
    datas = [p.read_bytes() for p in write_photos(folder, args.images, (width, height), 0)]

    def decode(data):
        return decode_image(data, 178_956_970, 1024).image  # ingest_images' defaults

    decode_ms = ms_per_image(decode, datas)

    def fresh_images():  # new image objects: nothing cached from an earlier pass
        return [decode(d) for d in datas]

    scores_ms = phash_ms = baseline_ms = float("inf")
    for _ in range(3):  # best of 3 passes, each over newly decoded images
        images = fresh_images()
        scores_ms = min(scores_ms, ms_per_image(image_scores, images, repeats=1))
        # the luma is shared: image_scores made it
        phash_ms = min(phash_ms, ms_per_image(phash_value, images, repeats=1))
        baseline_ms = min(baseline_ms, ms_per_image(by_definition, fresh_images(), repeats=1))
    total = decode_ms + scores_ms + phash_ms
    print(f"decode {decode_ms:.2f} ms; scores {scores_ms:.2f} ms; pHash {phash_ms:.2f} ms; "
          f"by definition {baseline_ms:.2f} ms", flush=True)
    print(json.dumps({
        "images": len(datas), "image_size": args.size, "decode_ms": round(decode_ms, 3),
        "scores_ms": round(scores_ms, 3), "phash_ms": round(phash_ms, 3),
        "scores_and_phash_by_definition_ms": round(baseline_ms, 3),
        "decode_scores_phash_over_decode": round(total / decode_ms, 3),
        "by_definition_over_decode": round((decode_ms + baseline_ms) / decode_ms, 3),
        "speedup_of_scores_and_phash": round(baseline_ms / (scores_ms + phash_ms), 3),
    }))


if __name__ == "__main__":
    main()
