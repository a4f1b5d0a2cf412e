"""What every benchmark shares: peak memory of a process tree, and `curate run` of a
config in a subprocess (start-up included, as a user sees it), from this checkout or
another one (an older release in a git worktree)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class PeakRss:
    """Peak resident memory of a process and all its children, sampled every 0.2 s; also
    the process's own high-water mark (VmHWM, exact, but only as of the last sample)."""

    def __init__(self, pid: int):
        import psutil  # here: benchmarks/gpu.py imports this module where psutil may be absent

        self.proc = psutil.Process(pid)
        self.peak = 0
        self.own_hwm_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        import psutil

        while not self._stop.is_set():
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
                total = sum(p.memory_info().rss for p in procs if p.is_running())
                self.peak = max(self.peak, total)
                self.own_hwm_kb = max(self.own_hwm_kb, vm_hwm_kb(self.proc.pid))
            except (psutil.Error, OSError, KeyError, ValueError):
                pass
            time.sleep(0.2)

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 1e6


def free_port() -> int:
    """A TCP port free on loopback now (for a server a benchmark starts)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vm_hwm_kb(pid: int | str = "self") -> int:
    """Peak resident memory (VmHWM) of one process, KiB: that process alone, no children."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise KeyError("VmHWM")


#: `python -c` body that runs `curate ARGS...` exactly as the console script does and, on
#: the way out (a finally block: typer ends with SystemExit), writes the process's own
#: VmHWM and the file `curate` was imported from to argv[1]. Ray's processes are separate
#: processes, so this is the `curate run` process alone.
_DRIVER = """
import json, sys
out = sys.argv.pop(1)
sys.argv[0] = "curate"
found = {}
try:
    import curate
    found["curate_file"] = curate.__file__
    from curate.cli import main
    main()
finally:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            found["vm_hwm_kb"] = int(line.split()[1])
    with open(out, "w") as f:
        json.dump(found, f)
"""


@dataclass
class CurateRun:
    """One `curate run` in a subprocess."""

    seconds: float
    peak_tree_mb: float  # the process and all its children (Ray's), sampled
    driver_peak_mb: float  # VmHWM of the `curate run` process alone
    summary: dict | None  # None when the run failed
    curate_file: str | None  # where `curate` was imported from
    error: str | None = None  # the end of stderr when the run failed


def _stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Ctrl-C to the run's own process group (curate stops cleanly on it; the local Ray it
    started goes with it), then SIGKILL to what is left of the group."""
    for sig, wait_s in ((signal.SIGINT, grace_s), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(wait_s)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def curate_run(config: dict, workdir: Path, label: str, checkout: Path = ROOT,
               timeout_s: float | None = None) -> CurateRun:
    """`curate run CONFIG --no-progress` into a fresh store, as a user runs it, importing
    `curate` from `checkout` (cwd and PYTHONPATH; this checkout by default) with this
    interpreter. A failed run, or one stopped after `timeout_s`, is returned with its
    error, not raised."""
    import yaml

    shutil.rmtree(config["store"]["uri"], ignore_errors=True)
    path = workdir / f"{label}.yaml"
    path.write_text(yaml.safe_dump(config))
    summary, driver = workdir / f"{label}.json", workdir / f"{label}.driver.json"
    for stale in (summary, driver):
        stale.unlink(missing_ok=True)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(checkout), *filter(None, [env.get("PYTHONPATH")])])
    env.pop("RAY_ADDRESS", None)  # a local Ray of its own, never someone else's cluster
    command = [sys.executable, "-c", _DRIVER, str(driver), "run", str(path), "--no-progress",
               "--json", str(summary)]
    started = time.perf_counter()
    # a session of its own, so that a run past its time is stopped with all it started
    proc = subprocess.Popen(command, cwd=checkout, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    rss = PeakRss(proc.pid)
    timed_out = False
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        _stop_group(proc)
        _, err = proc.communicate()
    except BaseException:  # Ctrl-C of the benchmark: the run goes too
        _stop_group(proc)
        raise
    seconds = time.perf_counter() - started
    peak = rss.stop()
    found = json.loads(driver.read_text()) if driver.exists() else {}
    hwm_kb = found.get("vm_hwm_kb") or rss.own_hwm_kb  # the sampled value if it died hard
    failed = timed_out or proc.returncode != 0 or not summary.exists()
    why = (f"stopped after {timeout_s:g} s (timeout)" if timed_out
           else f"exit {proc.returncode}")
    return CurateRun(
        seconds=seconds, peak_tree_mb=peak, driver_peak_mb=hwm_kb * 1024 / 1e6,
        summary=None if failed else json.loads(summary.read_text()),
        curate_file=found.get("curate_file"),
        error=f"{why}:\n{err[-3000:]}" if failed else None)


def run_curate(config: dict, workdir: Path, label: str) -> tuple[float, float, dict]:
    """(seconds, peak RSS MB of the whole process tree, run summary) of `curate run` into
    a fresh store."""
    run = curate_run(config, workdir, label)
    if run.error:
        raise SystemExit(f"curate run failed ({run.error}")
    return run.seconds, run.peak_tree_mb, run.summary


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


def photo_inputs(workdir: Path, count: int, image_size: str, startup_count: int,
                 write=None, name: str = "photos"
                 ) -> tuple[list[Path], Path, Path, tuple[int, int]]:
    """(paths, folder, start-up folder, (width, height)): photo-like JPEGs made from real
    photos (`write(folder, count, size=, seed=)`, curate's write_photos by default), reused
    from an earlier run in the same workdir when they are all there."""
    if write is None:
        from curate.media.samples import write_photos as write

    width, height = (int(x) for x in image_size.split("x"))
    media, small = workdir / name, workdir / f"startup_{name}"
    paths = sorted(media.glob("*.jpg")) if media.exists() else []
    if len(paths) != count:
        shutil.rmtree(media, ignore_errors=True)  # no stale photos from another count
        paths = write(media, count, size=(width, height), seed=0)
    if not small.exists():
        write(small, startup_count, size=(width, height), seed=1)
    return paths, media, small, (width, height)


def write_small_photos(directory: Path, count: int, size: tuple[int, int], seed: int = 0,
                       exact_copies: float = 0.0, near_copies: float = 0.0) -> list[Path]:
    """`count` small photo-like JPEGs (tens of pixels; about 1 ms each: the real photos are
    shrunk once to a few times `size` before the random crops, each turned or mirrored at
    random so that few distinct ones share a perceptual hash). About `exact_copies` of
    them are byte-identical copies of an earlier file and `near_copies` re-encodings of one
    (the same pixels at another JPEG quality), so the dedup stages have real work; copies
    only look back, so the first k files are a corpus of k in their own right."""
    import numpy as np
    from PIL import Image

    from curate.media.samples import base_photos, photo_like

    turns = [None, *Image.Transpose]  # the identity and the 7 other turns and mirrors
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    side = 3 * max(size)
    bases = [b.resize((side, max(1, round(side * b.height / b.width))),
                      Image.Resampling.BILINEAR) for b in base_photos()]
    written: list[bytes] = []
    paths = []
    for i in range(count):
        draw = rng.random()
        if written and draw < exact_copies:
            data = written[int(rng.integers(len(written)))]
        else:
            if written and draw < exact_copies + near_copies:
                img = Image.open(io.BytesIO(written[int(rng.integers(len(written)))]))
                quality = 75
            else:
                img, quality = photo_like(rng, bases, size), 90
                turn = turns[int(rng.integers(len(turns)))]
                img = img.transpose(turn) if turn is not None else img
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=quality)
            data = buf.getvalue()
        written.append(data)
        path = out / f"photo_{i:06d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths


def stand_in_model(workdir: Path, kind: str, size: str, build) -> Path:
    """A randomly initialised model (`build(path, size)`), built once into the workdir:
    speed does not depend on the weights."""
    model_dir = workdir / f"{kind}-{size}"
    if not (model_dir / "config.json").exists():
        build(model_dir, size)
    return model_dir


def startup_run(config_for, small: Path, workdir: Path, checkout: Path = ROOT,
                tag: str = "", timeout_s: float | None = None) -> CurateRun:
    """`curate run` on the few start-up photos: the fixed cost of a run."""
    run = curate_run(config_for(small, workdir / f"{tag}store_startup"), workdir,
                     f"{tag}startup", checkout, timeout_s)
    count = len(list(small.glob("*.jpg")))
    if not run.error:
        who = f"{tag.strip('-_ ')}: " if tag else ""
        print(f"{who}curate run on {count} images (fixed start-up): {run.seconds:.1f} s",
              flush=True)
    return run


def startup_and_run(config_for, small: Path, media: Path, workdir: Path
                    ) -> tuple[float, float, float, dict]:
    """(start-up seconds, run seconds, peak RSS MB, summary): `curate run` on the few
    start-up photos (the fixed cost) and then on all of them. `config_for(photos, store)`
    gives the pipeline config."""
    startup = startup_run(config_for, small, workdir)
    if startup.error:
        raise SystemExit(f"curate run failed ({startup.error}")
    run_s, peak_mb, summary = run_curate(config_for(media, workdir / "store"), workdir, "run")
    return startup.seconds, run_s, peak_mb, summary


def git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(ROOT), *args], check=True, capture_output=True,
                          text=True).stdout.strip()


def add_worktree(commit: str) -> tuple[Path, str]:
    """(checkout, full commit): `commit` checked out in a temporary git worktree."""
    full = git("rev-parse", "--verify", f"{commit}^{{commit}}")
    path = Path(tempfile.mkdtemp(prefix="curate-previous-")) / "curate"
    git("worktree", "add", "--detach", str(path), full)
    return path, full


def remove_worktree(path: Path) -> None:
    try:
        git("worktree", "remove", "--force", str(path))
    except subprocess.CalledProcessError as exc:
        print(f"warning: git worktree remove {path} failed: {exc.stderr.strip()}",
              file=sys.stderr)
    shutil.rmtree(path.parent, ignore_errors=True)
