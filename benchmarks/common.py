"""What every benchmark shares: peak memory of a process tree, and `curate run` of a
config in a subprocess (start-up included, as a user sees it)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import yaml

ROOT = Path(__file__).resolve().parent.parent


class PeakRss:
    """Peak resident memory of a process and all its children, sampled every 0.2 s."""

    def __init__(self, pid: int):
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = sum(p.memory_info().rss for p in procs if p.is_running())
                self.peak = max(self.peak, total)
            except psutil.Error:
                pass
            time.sleep(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 1e6


def run_curate(config: dict, workdir: Path, label: str) -> tuple[float, float, dict]:
    """(seconds, peak RSS MB of the whole process tree, run summary) of `curate run` into
    a fresh store."""
    shutil.rmtree(config["store"]["uri"], ignore_errors=True)
    path = workdir / f"{label}.yaml"
    path.write_text(yaml.safe_dump(config))
    summary = workdir / f"{label}.json"
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "curate", "run", str(path), "--no-progress",
                             "--json", str(summary)], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    _, err = proc.communicate()
    seconds = time.perf_counter() - started
    peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"curate run failed:\n{err[-3000:]}")
    return seconds, peak, json.loads(summary.read_text())


def steady_rate(items: int, run_s: float, startup_s: float) -> float | None:
    """Items per second once started: the whole run less the fixed start-up measured on a
    tiny input. None when the run is too short for the difference to mean anything."""
    if run_s < 1.5 * startup_s:
        return None
    return items / (run_s - startup_s)


def throughput(unit: str, items: int, run_s: float, loop_s: float, startup_s: float,
               peak_mb: float, digits: int = 2) -> dict:
    """The figures every benchmark reports: whole run and baseline loop, their ratio, the
    fixed start-up, the steady rate and its ratio, and peak memory."""
    steady = steady_rate(items, run_s, startup_s)
    loop_rate = items / loop_s
    return {
        "pipeline_seconds": round(run_s, 2),
        f"pipeline_{unit}_per_s": round(items / run_s, digits),
        "loop_seconds": round(loop_s, 2),
        f"loop_{unit}_per_s": round(loop_rate, digits),
        "ratio": round(loop_s / run_s, 3),
        "startup_seconds": round(startup_s, 2),
        f"pipeline_steady_{unit}_per_s": steady and round(steady, digits),
        "steady_ratio": steady and round(steady / loop_rate, 3),
        "peak_rss_mb": round(peak_mb, 1),
    }


def photo_inputs(workdir: Path, count: int, image_size: str, startup_count: int
                 ) -> tuple[list[Path], Path, Path, tuple[int, int]]:
    """(paths, folder, start-up folder, (width, height)): photo-like JPEGs made from real
    photos, reused from an earlier run in the same workdir when they are all there."""
    from curate.sample_media import write_photos

    width, height = (int(x) for x in image_size.split("x"))
    media, small = workdir / "photos", workdir / "startup_photos"
    paths = sorted(media.glob("*.jpg")) if media.exists() else []
    if len(paths) != count:
        paths = write_photos(media, count, size=(width, height), seed=0)
    if not small.exists():
        write_photos(small, startup_count, size=(width, height), seed=1)
    return paths, media, small, (width, height)


def stand_in_model(workdir: Path, kind: str, size: str, build) -> Path:
    """A randomly initialised model (`build(path, size)`), built once into the workdir:
    speed does not depend on the weights."""
    model_dir = workdir / f"{kind}-{size}"
    if not (model_dir / "config.json").exists():
        build(model_dir, size)
    return model_dir


def startup_and_run(config_for, small: Path, media: Path, workdir: Path
                    ) -> tuple[float, float, float, dict]:
    """(start-up seconds, run seconds, peak RSS MB, summary): `curate run` on the few
    start-up photos (the fixed cost) and then on all of them. `config_for(photos, store)`
    gives the pipeline config."""
    startup_s, _, _ = run_curate(config_for(small, workdir / "store_startup"), workdir,
                                 "startup")
    count = len(list(small.glob("*.jpg")))
    print(f"curate run on {count} images (fixed start-up): {startup_s:.1f} s", flush=True)
    run_s, peak_mb, summary = run_curate(config_for(media, workdir / "store"), workdir, "run")
    return startup_s, run_s, peak_mb, summary
