"""What iterating on a config costs: a first `curate run`, then one change at a time on
the same table, each a whole `curate run CONFIG --no-progress` in a subprocess:

    python benchmarks/iterate.py                 # 2,000 photos of 1024x768
    python benchmarks/iterate.py --photos 200    # quick
    python benchmarks/iterate.py --videos 8      # about 8 minutes of video, cut into clips
    python benchmarks/iterate.py --videos 6 --previous eb08e42   # and the same on a commit

The pipeline: ingest_images, image_quality, exact_dedup, phash_dedup, clip_embed,
aesthetic_score, nsfw_score, caption, semantic_dedup, diversity_sample, with stand-in
models (a tiny random CLIP, a random aesthetic head, a tiny random LLaVA; open_nsfw's real
weights). The changes, in order: a threshold in image_quality, a threshold in nsfw_score,
a new prompt for caption, a new vlm_score stage, aesthetic_score removed, nothing.

For each: whole seconds (the command, start-up included), the ratio to the first run,
rows read (inputs read again by the source), rows decoded (read by the source, or read
again by a recomputed stage that needs pixels), model rows (rows run through a model
stage) and the rows each stage computed, from the run record. At the end the table is
compared, row for row and column by column, with a fresh run of the final config (the
oracle; columns of rows a skipping stage never computed in the fresh run are history and
left out). Goals: threshold changes decode 0 rows, run 0 model rows and take <= 10% of
the first run; the new prompt runs only the captioner; the new stage computes only
itself. The last line printed is a JSON object.

With --videos: generated videos (pans over real photos with hard cuts, as
benchmarks/video_split.py makes them) through ingest_videos, split_clips, motion_score,
image_quality, clip_embed, nsfw_score, caption and semantic_dedup; the changes: the motion
threshold loosened (clips come back), a new aesthetic_score stage, a new caption prompt,
nothing. rows_read counts videos read (and cut) again whole: the goal is 0, each clip's
frames decoded again from its span.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import photo_inputs  # noqa: E402

MODELS = ROOT / "examples" / "models"
LLAVA = str(MODELS / "tiny-llava")
#: Stages that run a model (their computed rows are model rows).
MODEL_STAGES = {"clip_embed", "aesthetic_score", "nsfw_score", "caption", "vlm_score"}
#: Stages that need pixels when they compute (a recompute decodes the rows again).
PIXEL_STAGES = {"image_quality", "phash_dedup", "clip_embed", "nsfw_score", "caption",
                "vlm_score"}


def config(photos: Path, store: Path) -> dict:
    return {
        "name": "iterate",
        "store": {"uri": str(store)},
        "run": {"executor": "auto"},
        "stages": [
            {"type": "ingest_images", "paths": [str(photos)]},
            {"type": "image_quality", "min_side": 128, "min_blur": 10},
            {"type": "exact_dedup"},
            {"type": "phash_dedup", "max_distance": 8},
            {"type": "clip_embed", "model": str(MODELS / "tiny-clip")},
            {"type": "aesthetic_score", "weights": str(MODELS / "tiny-aesthetic.safetensors"),
             "sha256": "a7dcec5e39fdfd39452c466904035a155376b4be761ce794d54fc6257fbc5740"},
            {"type": "nsfw_score", "max_score": 0.9},
            {"type": "caption", "model": LLAVA, "max_new_tokens": 8},
            {"type": "semantic_dedup", "eps": 0.01},
            {"type": "diversity_sample", "target": 100, "clusters": 8},
        ],
    }


def video_config(videos: Path, store: Path) -> dict:
    return {
        "name": "iterate-videos",
        "store": {"uri": str(store), "table": "clips"},
        "run": {"executor": "auto"},
        "stages": [
            {"type": "ingest_videos", "paths": [str(videos)]},
            {"type": "split_clips", "min_clip_s": 1.0, "max_clip_s": 4.0,
             "frames_per_clip": 3},
            {"type": "motion_score", "min_score": 3.0},
            {"type": "image_quality", "min_side": 128, "min_blur": 5},
            {"type": "clip_embed", "model": str(MODELS / "tiny-clip")},
            {"type": "nsfw_score", "max_score": 0.9},
            {"type": "caption", "model": LLAVA, "max_new_tokens": 8},
            {"type": "semantic_dedup", "eps": 0.01},
        ],
    }


def _stage(raw: dict, kind: str) -> dict:
    return next(s for s in raw["stages"] if s["type"] == kind)


def _quality(raw):
    _stage(raw, "image_quality")["min_blur"] = 40


def _nsfw(raw):
    _stage(raw, "nsfw_score")["max_score"] = 0.1


def _prompt(raw):
    _stage(raw, "caption")["prompt"] = "Name the main object in a few words."


def _vlm_score(raw):
    at = raw["stages"].index(_stage(raw, "semantic_dedup"))
    raw["stages"].insert(at, {"type": "vlm_score", "model": LLAVA, "max_new_tokens": 12,
                              "criteria": {"quality": {"min": 1, "max": 5}}})


def _no_aesthetic(raw):
    raw["stages"].remove(_stage(raw, "aesthetic_score"))


CHANGES = [("image_quality threshold", _quality), ("nsfw_score threshold", _nsfw),
           ("caption prompt", _prompt), ("new vlm_score stage", _vlm_score),
           ("aesthetic_score removed", _no_aesthetic), ("nothing changed", None)]


def _motion(raw):
    _stage(raw, "motion_score")["min_score"] = 0.5


def _aesthetic(raw):
    at = raw["stages"].index(_stage(raw, "nsfw_score"))
    raw["stages"].insert(at, {
        "type": "aesthetic_score", "weights": str(MODELS / "tiny-aesthetic.safetensors"),
        "sha256": "a7dcec5e39fdfd39452c466904035a155376b4be761ce794d54fc6257fbc5740"})


VIDEO_CHANGES = [("motion_score threshold", _motion), ("new aesthetic_score stage", _aesthetic),
                 ("caption prompt", _prompt), ("nothing changed", None)]


def curate(raw: dict, workdir: Path, label: str, checkout: Path = ROOT) -> tuple[float, dict]:
    """One whole `curate run` of `checkout`'s curate: (seconds, its summary)."""
    path, summary = workdir / f"{label}.yaml", workdir / f"{label}.json"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    env.pop("RAY_ADDRESS", None)
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "curate", "run", str(path), "--no-progress",
                           "--json", str(summary)], cwd=checkout, env=env,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{label}: curate run failed:\n{proc.stderr[-3000:]}")
    return seconds, json.loads(summary.read_text())


def figures(seconds: float, first_s: float, summary: dict, pixel_stages=PIXEL_STAGES) -> dict:
    computed = {s["name"]: s.get("rows_computed", s.get("rows_processed", 0))
                for s in summary["stages"]}
    read = summary["rows_processed"]
    decoded = read + max([computed.get(s, 0) - read for s in pixel_stages] + [0])
    return {
        "seconds": round(seconds, 2),
        "ratio_to_first": round(seconds / first_s, 3),
        "rows_read": read,
        "rows_decoded": decoded,
        "model_rows": sum(computed.get(s, 0) for s in MODEL_STAGES),
        "verdicts_redecided": sum(s.get("verdicts_redecided", 0) for s in summary["stages"]),
        "computed": {k: v for k, v in computed.items() if v},
    }


def sequence(raw: dict, changes, workdir: Path, tag: str, checkout: Path,
             pixels) -> tuple[dict, float, dict]:
    """The first run and each change in turn on one store, with `checkout`'s curate:
    (figures per run, the first run's seconds, the final config)."""
    shutil.rmtree(raw["store"]["uri"], ignore_errors=True)
    first_s, summary = curate(raw, workdir, tag + "first", checkout)
    results = {"first run": figures(first_s, first_s, summary, pixels)}
    print(f"{tag}first run: {first_s:.1f} s", flush=True)
    for label, change in changes:
        raw = copy.deepcopy(raw)
        if change is not None:
            change(raw)
        seconds, summary = curate(raw, workdir, tag + label.replace(" ", "_"), checkout)
        results[label] = figures(seconds, first_s, summary, pixels)
        print(f"{tag}{label}: {json.dumps(results[label])}", flush=True)
    return results, first_s, raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=2000)
    parser.add_argument("--size", default="1024x768")
    parser.add_argument("--videos", type=float, default=None,
                        help="minutes of generated video instead of photos")
    parser.add_argument("--previous", default=None,
                        help="a commit whose curate makes the same changes too, on a store "
                        "of its own (a git worktree, this interpreter): the baseline")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-iterate-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = workdir / "store"
    if args.videos:
        from benchmarks.video_split import make_videos

        make_videos(workdir / "videos", args.videos)
        raw, changes, table_name = video_config(workdir / "videos", store), VIDEO_CHANGES, \
            "clips"
        # aesthetic_score beside clip_embed scores each frame's embedding: a recompute
        # decodes the clip's frames again for it
        pixels = PIXEL_STAGES | {"aesthetic_score"}
    else:
        _, photos, _, _ = photo_inputs(workdir, args.photos, args.size, 1)
        raw, changes, table_name = config(photos, store), CHANGES, "samples"
        pixels = PIXEL_STAGES
    first = raw
    results, first_s, raw = sequence(raw, changes, workdir, "", ROOT, pixels)
    previous, commit = None, None
    if args.previous:
        from benchmarks.common import add_worktree, remove_worktree

        checkout, commit = add_worktree(args.previous)
        try:
            raw_before = copy.deepcopy(first)
            raw_before["store"]["uri"] = str(workdir / "previous-store")
            previous, _, _ = sequence(raw_before, changes, workdir, "previous-", checkout,
                                      pixels)
        finally:
            remove_worktree(checkout)
        for label, figures_now in results.items():
            figures_now["ratio_to_previous"] = round(
                figures_now["seconds"] / previous[label]["seconds"], 3)

    import lancedb

    from tests.helpers import table_differences

    fresh = copy.deepcopy(raw)
    fresh["store"]["uri"] = str(workdir / "fresh")
    shutil.rmtree(workdir / "fresh", ignore_errors=True)
    fresh_s, _ = curate(fresh, workdir, "fresh")

    def table(where):
        return lancedb.connect(str(where)).open_table(table_name).to_arrow().sort_by(
            "sample_id")

    differ = table_differences(table(store), table(workdir / "fresh"), raw)
    out = {
        "benchmark": "iterate",
        "cpus": os.cpu_count(),
        "first_run_s": round(first_s, 2),
        "fresh_run_of_final_config_s": round(fresh_s, 2),
        "runs": results,
        **({"previous": commit, "previous_runs": previous} if previous else {}),
        "same_table_as_fresh_run": not differ,
        "columns_that_differ": differ,
    }
    if args.videos:
        out |= {"videos_minutes": args.videos,
                "videos_read_again_whole": sum(r["rows_read"] for k, r in results.items()
                                               if k != "first run")}
        print(json.dumps(out))
        return
    thresholds = [results[k] for k in ("image_quality threshold", "nsfw_score threshold")]
    out |= {
        "photos": args.photos,
        "size": args.size,
        "thresholds_decode_0": all(r["rows_decoded"] == 0 for r in thresholds),
        "thresholds_model_rows_0": all(r["model_rows"] == 0 for r in thresholds),
        "thresholds_max_ratio": max(r["ratio_to_first"] for r in thresholds),
        "prompt_change_computes_only": sorted(
            k for k in results["caption prompt"]["computed"]
            if k not in ("exact_dedup", "semantic_dedup", "diversity_sample")),
        "new_stage_computes_only": sorted(
            k for k in results["new vlm_score stage"]["computed"]
            if k not in ("exact_dedup", "semantic_dedup", "diversity_sample")),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
