"""Video splitting: `curate run` of ingest_videos + split_clips (scenes) + motion_score
against a plain single-process loop doing the same with PyAV and PySceneDetect, in seconds
of video per second.

Inputs are generated: pans over real photos with hard cuts every 2-6 s, half at 640x360
and half at 1280x720 (24 fps, H.264). The loop hashes each file, decodes every frame with
PyAV (threaded, as curate does), runs PySceneDetect's ContentDetector on frames 256 px wide
and measures motion as the mean change between consecutive 64 px grey frames per shot,
as split_clips does. Both keep the same clips (shots of at least 1 s). Run:
python benchmarks/video_split.py [--minutes 4]
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import curate_run, throughput

FPS = 24
SIZES = ((640, 360), (1280, 720))


def make_videos(folder: Path, minutes: float, seed: int = 0) -> list[Path]:
    """Videos of about a minute each, alternating sizes, reused when already there."""
    from curate.media.samples import write_video_with_cuts

    folder.mkdir(parents=True, exist_ok=True)
    count = max(2, round(minutes))
    paths = []
    for k in range(count):
        path = folder / f"video_{k:03d}_{SIZES[k % 2][0]}.mp4"
        paths.append(path)
        if path.exists():
            continue
        rng = np.random.default_rng(seed + k)
        shots = list(rng.uniform(2, 6, 30))
        while len(shots) > 1 and sum(shots) > 60 * minutes / count:
            shots.pop()
        write_video_with_cuts(path.with_suffix(".part.mp4"), shots, SIZES[k % 2], fps=FPS,
                              seed=seed + k)
        path.with_suffix(".part.mp4").rename(path)
    return paths


def plain_loop(paths: list[Path]) -> tuple[float, int]:
    """(seconds of video, clips): the same work in one process, one video after another."""
    import av
    from scenedetect import FrameTimecode
    from scenedetect.detectors import ContentDetector

    seconds, clips = 0.0, 0
    for path in paths:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(1 << 20):
                digest.update(block)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            fps = float(stream.average_rate)
            detector = ContentDetector(threshold=27.0, min_scene_len=round(fps / 2))
            cuts, changes, previous = [0], [], None
            index = -1
            for index, frame in enumerate(container.decode(stream)):
                width = min(256, frame.width)
                height = round(frame.height * width / frame.width)
                small = frame.reformat(width=width, height=height, format="bgr24").to_ndarray()
                cuts += [c.frame_num for c in
                         detector.process_frame(FrameTimecode(index, fps), small)]
                grey = frame.reformat(width=64, height=round(frame.height * 64 / frame.width),
                                      format="gray").to_ndarray().astype(np.int16)
                changes.append(0.0 if previous is None else float(np.abs(grey - previous).mean()))
                previous = grey
            cuts += [c.frame_num for c in detector.post_process(FrameTimecode(index, fps))]
            cuts.append(index + 1)
            motion = np.asarray(changes)
            for start, end in itertools.pairwise(cuts):
                if end - start >= fps:  # min_clip_s 1
                    float(motion[start + 1:end].mean())
                    clips += 1
            seconds += (index + 1) / fps
    return seconds, clips


def config(media: Path, store: Path) -> dict:
    return {
        "name": "video-bench",
        "store": {"uri": str(store), "table": "clips"},
        "stages": [
            {"type": "ingest_videos", "paths": [str(media)]},
            {"type": "split_clips", "method": "scenes", "min_clip_s": 1.0,
             "max_clip_s": None},
            {"type": "motion_score"},
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=4.0, help="video in total")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.gettempdir()) / "curate-bench-video"
    t = time.perf_counter()
    paths = make_videos(workdir / "videos", args.minutes)
    small = make_videos(workdir / "startup", 0.1, seed=100)  # two short videos
    print(f"inputs: {len(paths)} videos ({sum(p.stat().st_size for p in paths) / 1e6:.0f} "
          f"MB) in {workdir} [{time.perf_counter() - t:.0f} s to make or find]", flush=True)

    rss0 = psutil.Process().memory_info().rss
    t = time.perf_counter()
    video_s, loop_clips = plain_loop(paths)
    loop_s = time.perf_counter() - t
    loop_rss = max(psutil.Process().memory_info().rss - rss0, 0) / 1e6
    print(f"plain loop: {loop_s:.1f} s for {video_s:.0f} s of video "
          f"({video_s / loop_s:.1f} s/s), {loop_clips} clips", flush=True)

    startup = curate_run(config(small[0].parent, workdir / "store_startup"), workdir,
                         "startup")
    if startup.error:
        raise SystemExit(startup.error)
    print(f"curate run on two short videos (fixed start-up): {startup.seconds:.1f} s",
          flush=True)
    run = curate_run(config(workdir / "videos", workdir / "store"), workdir, "run")
    if run.error:
        raise SystemExit(run.error)
    import lancedb

    table = lancedb.connect(str(workdir / "store")).open_table("clips").to_arrow()
    clips = int(np.sum(np.asarray(table["media_type"].to_pylist()) == "video_clip"))
    print(f"curate run: {run.seconds:.1f} s ({video_s / run.seconds:.1f} s/s), {clips} "
          "clips", flush=True)
    result = {
        "videos": len(paths),
        "video_seconds": round(video_s, 1),
        "sizes": [f"{w}x{h}" for w, h in SIZES],
        "cpus": os.cpu_count(),
        **throughput("video_s", video_s, run.seconds, loop_s, startup.seconds,
                     run.peak_tree_mb),
        "driver_peak_mb": round(run.driver_peak_mb, 1),
        "loop_rss_growth_mb": round(loop_rss, 1),
        "clips": clips,
        "loop_clips": loop_clips,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
