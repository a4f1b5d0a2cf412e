"""`curate plan` against the run it predicts: a plan from a seeded sample of a corpus,
then a real `curate run` of the whole corpus on the same machine, and the two compared on
wall time (the whole command) and table size (the bytes of the table's current version).

Image pipeline: configs/demo.yaml (its stages and stand-in models) on a corpus of
photo-like JPEGs of four sizes (320x240 to 1280x960) with the demo's broken and odd files
among them; plan from --sample inputs (default 200) for a corpus of --images (2,000).
Video pipeline: configs/video-demo.yaml on generated videos with hard cuts (pans over real
photos, 6 to 20 s, two sizes); plan from --video-sample videos for --videos.

    python benchmarks/plan.py                         # 200 -> 2,000 images, 8 -> 40 videos
    python benchmarks/plan.py --images 400 --sample 40 --videos 0

Targets: wall time within 30%, table size within 15%. Each run is a whole command in a
subprocess into a fresh store (`curate plan` and `curate run`). The last line printed is a
JSON object; the exit status is 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import curate_run  # noqa: E402

SIZES = ((320, 240), (640, 480), (960, 720), (1280, 960))


def image_corpus(folder: Path, count: int) -> Path:
    """`count` inputs: the demo's media (broken, odd and duplicate files included) and
    photo-like JPEGs of four sizes, reused when already there."""
    from curate.media.samples import write_photos

    done = folder / ".done"
    if done.exists() and done.read_text() == str(count):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    demo = sorted(p for p in (ROOT / "examples" / "media").rglob("*") if p.is_file()
                  and p.suffix != ".tar")
    for k, path in enumerate(demo[:count]):
        shutil.copy(path, folder / f"demo_{k:03d}_{path.name}")
    left = count - min(len(demo), count)
    for i, size in enumerate(SIZES):
        part = left // len(SIZES) + (1 if i < left % len(SIZES) else 0)
        for path in write_photos(folder / f"tmp{i}", part, size=size, seed=100 + i):
            path.rename(folder / f"s{i}_{path.name}")
        shutil.rmtree(folder / f"tmp{i}")
    done.write_text(str(count))
    return folder


def video_corpus(folder: Path, count: int) -> Path:
    from curate.media.samples import write_video_with_cuts

    done = folder / ".done"
    if done.exists() and done.read_text() == str(count):
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for k in range(count):
        rng = np.random.default_rng(k)
        shots = list(rng.uniform(1.5, 5.0, 8))
        while len(shots) > 2 and sum(shots) > rng.uniform(6, 20):
            shots.pop()
        write_video_with_cuts(folder / f"video_{k:03d}.mp4", shots,
                              ((320, 180), (480, 270))[k % 2], fps=12, seed=k)
    done.write_text(str(count))
    return folder


def _config(name: str, media: Path, store: Path) -> dict:
    raw = yaml.safe_load((ROOT / "configs" / name).read_text())
    raw["store"] = {"uri": str(store), "table": raw["store"].get("table", "samples")}
    raw["stages"][0]["paths"] = [str(media)]
    return raw


def table_bytes(store: Path, table: str) -> int:
    from curate.config import StoreConfig
    from curate.forecast import table_bytes as current_bytes
    from curate.table.store import Store

    return current_bytes(Store(StoreConfig(uri=str(store), table=table)))


def compare(label: str, config_name: str, media: Path, workdir: Path, sample: int,
            target: int) -> dict:
    raw = _config(config_name, media, workdir / f"{label}_store")
    path = workdir / f"{label}.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = workdir / f"{label}_plan.json"
    started = time.perf_counter()
    planned = subprocess.run(
        [sys.executable, "-m", "curate", "plan", str(path), "--sample", str(sample),
         "--target", str(target), "--json", str(out)], cwd=ROOT, capture_output=True,
        text=True)
    plan_s = time.perf_counter() - started
    if planned.returncode:
        raise SystemExit(f"curate plan failed:\n{planned.stdout[-3000:]}{planned.stderr[-3000:]}")
    print(planned.stdout, flush=True)
    result = json.loads(out.read_text())
    run = curate_run(raw, workdir, f"{label}_run")
    if run.error:
        raise SystemExit(f"curate run failed ({run.error}")
    actual_bytes = table_bytes(workdir / f"{label}_store", raw["store"]["table"])
    wall = result["wall_seconds"]
    figures = {
        "sample": sample, "target": target, "plan_seconds": round(plan_s, 1),
        "predicted_wall_s": round(wall["estimate"], 1),
        "predicted_wall_range_s": [round(wall["low"], 1), round(wall["high"], 1)],
        "actual_wall_s": round(run.seconds, 1),
        "wall_error": round(wall["estimate"] / run.seconds - 1, 3),
        "predicted_table_bytes": round(result["table_bytes"]["estimate"]),
        "actual_table_bytes": actual_bytes,
        "table_error": round(result["table_bytes"]["estimate"] / actual_bytes - 1, 3),
        "predicted_rows": result["rows"], "actual_rows": run.summary["rows_total"],
        "predicted_selected": result["selected"], "actual_selected": run.summary["selected"],
        "bottleneck": result["bottleneck"]["stage"],
    }
    figures["within_targets"] = abs(figures["wall_error"]) <= 0.30 and \
        abs(figures["table_error"]) <= 0.15
    print(f"{label}: wall predicted {figures['predicted_wall_s']} s "
          f"({figures['predicted_wall_range_s'][0]}-{figures['predicted_wall_range_s'][1]}), "
          f"actual {figures['actual_wall_s']} s ({100 * figures['wall_error']:+.1f}%); table "
          f"predicted {figures['predicted_table_bytes']:,} B, actual {actual_bytes:,} B "
          f"({100 * figures['table_error']:+.1f}%); plan took {figures['plan_seconds']} s",
          flush=True)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--sample", type=int, default=200)
    parser.add_argument("--videos", type=int, default=40)
    parser.add_argument("--video-sample", type=int, default=8)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-bench-plan-"))
    workdir.mkdir(parents=True, exist_ok=True)
    out = {}
    if args.images:
        media = image_corpus(workdir / "images", args.images)
        out["images"] = compare("images", "demo.yaml", media, workdir, args.sample,
                                args.images)
    if args.videos:
        media = video_corpus(workdir / "videos", args.videos)
        out["videos"] = compare("videos", "video-demo.yaml", media, workdir,
                                args.video_sample, args.videos)
    print(json.dumps(out))
    return 0 if all(v["within_targets"] for v in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
