"""Export to training: `curate export` to WebDataset (whole command, start-up included)
against a plain single-process loop writing the same shards with `tarfile`; and
`LanceDataset` in a DataLoader against a DataLoader reading the same files with PIL.

    python benchmarks/export.py --images 5000

The table is made first by `curate run` (ingest only: every photo selected). The last line
printed is a JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import PeakRss, photo_inputs, run_curate  # noqa: E402

SHARD_SIZE = 1000
#: Metadata that goes along with each sample, in both the loop and curate.
COLUMNS = ["sample_id", "uri", "width", "height", "num_bytes", "format"]


def table_config(media: Path, store: Path) -> dict:
    return {"name": "export-bench", "store": {"uri": str(store)},
            "stages": [{"type": "ingest_images", "paths": [str(media)]}]}


def baseline_loop(store: Path, out: Path) -> int:
    """What one would write by hand: read the selected rows, then each file into a tar
    shard with its metadata, a shard every SHARD_SIZE samples."""
    import lance

    rows = lance.dataset(str(store / "samples.lance")).to_table(
        columns=COLUMNS, filter="selected = true").sort_by("sample_id").to_pylist()
    out.mkdir(parents=True, exist_ok=True)
    for start in range(0, len(rows), SHARD_SIZE):
        with tarfile.open(out / f"shard-{start // SHARD_SIZE:06d}.tar", "w") as tar:
            for row in rows[start:start + SHARD_SIZE]:
                for name, data in ((f"{row['sample_id']}.jpg", Path(row["uri"]).read_bytes()),
                                   (f"{row['sample_id']}.json",
                                    json.dumps(row, sort_keys=True).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return len(rows)


def curate_export(store: Path, out: Path, executor: str,
                  count: int | None = None) -> tuple[float, float]:
    """(seconds, peak RSS MB of the process tree) of the whole `curate export` command."""
    command = [sys.executable, "-m", "curate", "export", "--store", str(store), "--out",
               str(out), "--shard-size", str(SHARD_SIZE), "--columns", ",".join(COLUMNS[1:]),
               "--overwrite", "--no-progress", "--executor", executor]
    if count is not None:
        command += ["--limit", str(count)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    started = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    rss = PeakRss(proc.pid)
    stdout, stderr = proc.communicate()
    seconds, peak = time.perf_counter() - started, rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"curate export failed: {stderr[-2000:]}{stdout[-2000:]}")
    return seconds, peak


def _decode_file(path: str):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").size


def _size_of(sample: dict):
    return sample["image"].size


class _Files:
    """A map-style dataset of image files decoded with PIL: the loader baseline."""

    def __init__(self, paths: list[str]):
        self.paths = paths

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return _decode_file(self.paths[i])


def loader_rate(dataset, workers: int) -> tuple[float, int]:
    """(samples per second, samples) through a DataLoader with `workers` workers."""
    import torch

    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=workers,
        multiprocessing_context=multiprocessing.get_context("spawn"))
    started = time.perf_counter()
    count = sum(1 for _ in loader)
    return count / (time.perf_counter() - started), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-bench-export-"))
    paths, media, _, (width, height) = photo_inputs(workdir, args.images, args.size, 16)
    total_mb = sum(p.stat().st_size for p in paths) / 1e6
    print(f"inputs: {len(paths)} JPEGs of {width}x{height} ({total_mb:.0f} MB) in {workdir}",
          flush=True)
    store = workdir / "store"
    run_curate(table_config(media, store), workdir, "table")

    # warm the page cache for both sides alike
    for path in paths:
        path.read_bytes()
    t = time.perf_counter()
    rows = baseline_loop(store, workdir / "loop-shards")
    loop_s = time.perf_counter() - t
    print(f"plain loop: {loop_s:.1f} s, {rows / loop_s:.0f} samples/s", flush=True)

    figures = {}
    # auto: what a user gets (threads here below 20,000 rows); ray: the cluster path
    for executor in ("auto", "ray"):
        startup_s, _ = curate_export(store, workdir / "startup-shards", executor, count=16)
        run_s, peak_mb = curate_export(store, workdir / "shards", executor)
        steady = rows / (run_s - startup_s) if run_s > 1.5 * startup_s else None
        print(f"curate export --executor {executor}: {run_s:.1f} s, {rows / run_s:.0f} "
              f"samples/s; 16 samples (fixed start-up): {startup_s:.1f} s", flush=True)
        figures[executor] = {
            "export_seconds": round(run_s, 2), "ratio": round(loop_s / run_s, 3),
            "startup_seconds": round(startup_s, 2),
            "export_steady_samples_per_s": steady and round(steady, 1),
            "steady_ratio": steady and round(steady / (rows / loop_s), 3),
            "peak_rss_mb": round(peak_mb, 1)}

    from curate.data import LanceDataset

    lance_rate, seen = loader_rate(LanceDataset(str(store), transform=_size_of),
                                   args.workers)
    files_rate, _ = loader_rate(_Files([str(p) for p in paths]), args.workers)
    print(f"LanceDataset: {lance_rate:.0f} samples/s ({seen}); files with PIL: "
          f"{files_rate:.0f} samples/s", flush=True)
    result = {
        "images": rows, "image_size": f"{width}x{height}", "megabytes": round(total_mb),
        "cpus": os.cpu_count(), "shard_size": SHARD_SIZE,
        "loop_seconds": round(loop_s, 2), "loop_samples_per_s": round(rows / loop_s, 1),
        **{f"{executor}": values for executor, values in figures.items()},
        "lance_dataset_samples_per_s": round(lance_rate, 1),
        "files_pil_samples_per_s": round(files_rate, 1),
        "loader_ratio": round(lance_rate / files_rate, 3),
        "loader_workers": args.workers,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
