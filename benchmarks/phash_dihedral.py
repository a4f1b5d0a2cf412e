"""phash_dedup with and without `invariance: dihedral`: the stage's time (its row part,
the hashes of decoded images, and its global part, the band-bucket search and the groups)
and how well each finds turned and mirrored copies among real-photo crops.

    python benchmarks/phash_dihedral.py --crops 3000 --copies 0.2

Crops of real photos (scikit-image, scikit-learn's samples), decoded once before timing;
their luma is made before timing too (the pool's other pixel stages share it), so the
times are the stage's own work: resize, DCT, hashes, search. A fraction of the crops get a
copy: turned or mirrored in one of the 7 ways, and half of those also resized and
re-encoded as JPEG. Recall: copy pairs that end up in one group. Precision: pairs in one
group that are not of different photos; also shown with crops of one photo overlapping
less than half counted as wrong, and strictly (only a crop and its copy right). Both modes
run on the same images, alternately (each first in turn), best of --repeats, in CPU
seconds. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "coins", "moon",
          "page", "text", "brick", "grass", "gravel", "hubble_deep_field", "retina",
          "immunohistochemistry", "colorwheel", "clock")
BATCH = 32  # rows per batch, as ingest_images hands them on by default


def base_photos() -> list[Image.Image]:
    import skimage.data
    from sklearn.datasets import load_sample_images

    out = [Image.fromarray(a) for a in load_sample_images().images]
    for name in PHOTOS:
        try:
            out.append(Image.fromarray(getattr(skimage.data, name)()).convert("RGB"))
        except Exception:  # a photo this scikit-image does not ship
            continue
    return out


def make_images(count: int, copies: float, seed: int
                ) -> tuple[list[Image.Image], np.ndarray, np.ndarray]:
    """(images, origin, crops): crops and copies of some of them; origin[i] is the crop
    image i is (a copy of); crops[k] = (photo, x0, y0, x1, y1) of crop k."""
    rng = np.random.default_rng(seed)
    bases = base_photos()
    turns = list(Image.Transpose)
    images, origin, boxes = [], [], []
    crops = round(count / (1 + copies))
    for i in range(crops):
        which = int(rng.integers(len(bases)))
        w, h = bases[which].size
        cw, ch = int(w * rng.uniform(0.3, 0.9)), int(h * rng.uniform(0.3, 0.9))
        x, y = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        images.append(bases[which].crop((x, y, x + cw, y + ch)))
        origin.append(i)
        boxes.append((which, x, y, x + cw, y + ch))
    for i in rng.choice(crops, count - crops, replace=False):
        img = images[i].transpose(turns[int(rng.integers(len(turns)))])
        if rng.random() < 0.5:
            scale = rng.uniform(0.5, 0.9)
            img = img.resize((max(8, round(img.width * scale)), max(8, round(img.height * scale))),
                             Image.Resampling.LANCZOS)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=int(rng.integers(70, 95)))
            img = Image.open(buf).convert("RGB")
        images.append(img)
        origin.append(int(i))
    return images, np.array(origin), np.array(boxes)


def related(crops: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whether crops a and b are of one photo and overlap by at least RELATED_IOU
    (intersection over union): the same picture cropped a little differently, not an
    unrelated photo."""
    ca, cb = crops[a], crops[b]
    iw = np.clip(np.minimum(ca[:, 3], cb[:, 3]) - np.maximum(ca[:, 1], cb[:, 1]), 0, None)
    ih = np.clip(np.minimum(ca[:, 4], cb[:, 4]) - np.maximum(ca[:, 2], cb[:, 2]), 0, None)
    area = lambda c: (c[:, 3] - c[:, 1]) * (c[:, 4] - c[:, 2])  # noqa: E731
    inter = iw * ih
    return (ca[:, 0] == cb[:, 0]) & (inter >= RELATED_IOU * (area(ca) + area(cb) - inter))


RELATED_IOU = 0.5


def stage_times(stage, table, images) -> tuple[float, float, dict]:
    """(row seconds, global seconds, verdicts) of one pass of the stage; CPU seconds of
    this process (everything runs here), which other work on a shared machine moves far
    less than wall time."""
    import pyarrow as pa

    started = time.process_time()
    parts: dict[str, list] = {}
    for lo in range(0, len(images), BATCH):
        out = stage.process(table.slice(lo, BATCH), images[lo:lo + BATCH])
        for name, values in out.items():
            parts.setdefault(name, []).append(values)
    row_s = time.process_time() - started
    for name, chunks in parts.items():
        table = table.append_column(name, pa.chunked_array(chunks))
    started = time.process_time()
    verdicts = stage.run_global(table, pa.array([True] * table.num_rows))["phash_duplicate_of"]
    return row_s, time.process_time() - started, verdicts.to_pylist()


def pair_scores(verdicts: list, ids: list[str], origin: np.ndarray, crops: np.ndarray) -> dict:
    """Recall over crop-and-copy pairs. Precision over the pairs in one group, three ways:
    against unrelated photos (wrong: crops of different photos); also counting crops of
    one photo overlapping less than RELATED_IOU as wrong; strict (right: a crop and its
    copy only; other crops of one photo are near-duplicates of it but count as wrong)."""
    where = {s: i for i, s in enumerate(ids)}
    group = np.array([where[v] if v is not None else i for i, v in enumerate(verdicts)])
    true_pairs = found = 0
    for o in np.unique(origin):
        members = np.flatnonzero(origin == o)
        if members.size > 1:
            true_pairs += members.size * (members.size - 1) // 2
            found += sum(group[a] == group[b] for k, a in enumerate(members)
                         for b in members[k + 1:])
    grouped = copies = other_photo = apart = 0
    for g in np.unique(group):
        members = np.flatnonzero(group == g)
        if members.size < 2:
            continue
        a, b = np.triu_indices(members.size, 1)
        oa, ob = origin[members[a]], origin[members[b]]
        grouped += a.size
        copies += int((oa == ob).sum())
        other_photo += int((crops[oa, 0] != crops[ob, 0]).sum())
        apart += int((~related(crops, oa, ob)).sum())

    def share(wrong: int) -> float:
        return round(1 - wrong / grouped, 4) if grouped else 1.0

    return {"recall": round(found / max(true_pairs, 1), 4), "precision": share(other_photo),
            "precision_overlap": share(apart), "strict_precision": share(grouped - copies),
            "copy_pairs": int(true_pairs), "grouped_pairs": int(grouped),
            "other_photo_pairs": int(other_photo), "low_overlap_pairs": int(apart - other_photo)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--crops", type=int, default=3000, help="images in all, copies included")
    parser.add_argument("--copies", type=float, default=0.2,
                        help="copies per crop (each of a different crop)")
    parser.add_argument("--max-distance", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import pyarrow as pa

    from curate.media.decode import luma
    from curate.stages.table.phash_dedup import PhashDedup

    images, origin, crops = make_images(args.crops, args.copies, args.seed)
    for img in images:
        luma(img)  # shared with the pool's other pixel stages: not this stage's work
    n = len(images)
    ids = [f"s{i:06d}" for i in range(n)]
    table = pa.table({"sample_id": ids, "uri": [f"u{i:06d}" for i in range(n)],
                      "width": pa.array([im.width for im in images], pa.int32()),
                      "height": pa.array([im.height for im in images], pa.int32()),
                      "num_bytes": pa.array([im.width * im.height for im in images], pa.int64())})
    sides = np.array([max(im.size) for im in images])
    print(f"{n} images ({n - np.unique(origin).size} turned copies), longest side "
          f"{int(np.median(sides))} px median ({sides.min()}-{sides.max()})", flush=True)
    modes = {"none": PhashDedup(max_distance=args.max_distance),
             "dihedral": PhashDedup(max_distance=args.max_distance, invariance="dihedral")}
    best = {m: [float("inf"), float("inf"), float("inf")] for m in modes}
    scores = {}
    for repeat in range(args.repeats):
        for mode in sorted(modes, reverse=bool(repeat % 2)):  # each mode first in turn
            stage = modes[mode]
            row_s, global_s, verdicts = stage_times(stage, table, images)
            b = best[mode]
            b[:] = min(b[0], row_s), min(b[1], global_s), min(b[2], row_s + global_s)
            scores[mode] = pair_scores(verdicts, ids, origin, crops) | {
                "near_pairs": stage.report.get("near_pairs", 0)}
    for mode, (row_s, global_s, total_s) in best.items():
        print(f"{mode:>8}: stage {total_s:.3f} CPU s (rows {row_s:.3f}, global {global_s:.3f}); "
              f"recall {scores[mode]['recall']:.3f}; precision {scores[mode]['precision']:.3f} "
              f"against unrelated photos ({scores[mode]['precision_overlap']:.3f} with crops "
              f"of one photo overlapping < {RELATED_IOU} wrong too, "
              f"{scores[mode]['strict_precision']:.3f} with only crop and copy right)",
              flush=True)
    ratio = best["dihedral"][2] / best["none"][2]
    rows_ratio = best["dihedral"][0] / best["none"][0]
    global_ratio = best["dihedral"][1] / best["none"][1]
    print(f"dihedral / none: stage CPU time x{ratio:.3f} (rows x{rows_ratio:.3f}, "
          f"global x{global_ratio:.3f})", flush=True)
    print(json.dumps({
        "images": n, "max_distance": args.max_distance,
        **{f"{mode}_{part}_s": round(best[mode][k], 4) for mode in modes
           for k, part in enumerate(("rows", "global", "stage"))},
        "stage_time_ratio": round(ratio, 3),
        "rows_time_ratio": round(rows_ratio, 3), "global_time_ratio": round(global_ratio, 3),
        **{f"{mode}_{key}": value for mode in modes for key, value in scores[mode].items()},
    }))


if __name__ == "__main__":
    main()
