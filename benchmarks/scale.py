"""Memory and throughput of a whole `curate run` as the rows grow, against the previous
release: ingest_images -> image_quality -> exact_dedup -> phash_dedup -> clip_embed ->
semantic_dedup -> diversity_sample over small photo-like JPEGs (with byte copies and
re-encoded copies among them), with a wide stand-in CLIP (random weights, tiny towers,
2048-d embeddings: 8 KB of vector a row), at N and 8N rows.

    python benchmarks/scale.py                      # N = 3000: 3,000 and 24,000 rows
    python benchmarks/scale.py --rows 300 --skip-previous

Each run is a whole `curate run CONFIG --no-progress` in a subprocess into a fresh store,
on a local Ray over the whole machine (run.num_cpus unset). The previous release
(`--previous`, a commit) runs from a temporary git worktree with the same interpreter,
its `curate` imported from there (cwd and PYTHONPATH); the worktree is removed at the
end. After one uncounted warm-up run each (bytecode, disk caches), the two alternate run
by run, so drift over the run hits both alike.

driver_peak_rss_mb is the peak resident memory (VmHWM) of the `curate run` process alone:
Ray's raylet, object store and workers are other processes. rss_growth_ratio is its growth
from N to 8N rows over the vector bytes those rows add (target < 0.25): the driver should
hold little beyond the vectors a global stage needs. throughput_ratio_8n is current over
previous images per second at 8N (target >= 1.0). A run that fails is reported with its
error and null figures, and the exit status is 1. The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import (  # noqa: E402
    CurateRun,
    add_worktree,
    curate_run,
    git,
    photo_inputs,
    remove_worktree,
    stand_in_model,
    startup_run,
    steady_rate,
    write_small_photos,
)

DIM = 2048  # the "wide" stand-in CLIP's projection_dim
EXACT_COPIES, NEAR_COPIES = 0.05, 0.05  # fractions of the corpus
#: What the issue measured with this pipeline on the previous release (driver peak, MB).
ISSUE_BASELINE = {3000: 672, 24000: 1659}


def pipeline_config(photos: Path, store: Path, model_dir: Path,
                    executor: str | None = None) -> dict:
    rows = len(list(photos.glob("*.jpg")))
    return {
        "name": "bench-scale",
        "store": {"uri": str(store)},
        # releases before run.executor always ran on Ray
        **({"run": {"executor": executor}} if executor else {}),
        "stages": [
            {"type": "ingest_images", "paths": [str(photos)]},
            {"type": "image_quality", "min_side": 32, "min_brightness": 10.0},
            {"type": "exact_dedup"},
            {"type": "phash_dedup", "max_distance": 4},
            {"type": "clip_embed", "model": str(model_dir)},
            # random weights put distinct photos within about 1e-3 of each other (cosine
            # distance); 1e-5 marks copies (the dedups above take them first) and few
            # others, so most rows stay alive for the sample
            {"type": "semantic_dedup", "eps": 1e-5},
            {"type": "diversity_sample", "target": max(1, rows // 2)},
        ],
    }


def first_rows(corpus: list[Path], count: int, folder: Path) -> Path:
    """A folder of the corpus's first `count` files (hard links): a corpus in its own right,
    since copies only look back."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in corpus[:count]:
        try:
            os.link(path, folder / path.name)
        except OSError:
            shutil.copyfile(path, folder / path.name)
    return folder


class Side:
    """One checkout of curate and what its runs measured."""

    def __init__(self, name: str, checkout: Path, commit: str):
        self.name, self.checkout, self.commit = name, checkout, commit
        self.startup: CurateRun | None = None
        self.runs: list[CurateRun] = []
        self.error: str | None = None
        self.curate_file: str | None = None  # where its runs imported curate from

    def check(self, run: CurateRun, what: str) -> bool:
        """Record a failed run (or one that imported curate from the wrong place)."""
        self.curate_file = self.curate_file or run.curate_file
        if run.curate_file and not Path(run.curate_file).resolve().is_relative_to(
                self.checkout.resolve()):
            run.error = (f"imported curate from {run.curate_file}, not from {self.checkout}")
        if run.error and not self.error:
            self.error = f"{what}: {short_error(run.error)}"
            tail = "\n    ".join(run.error.strip().splitlines()[-15:])
            print(f"{self.name}: {what} FAILED:\n    {tail}", flush=True)
        return not run.error

    def figures(self, rows: list[int]) -> dict:
        """The figures at each row count (None where a run failed or did not run)."""
        done = not self.error and len(self.runs) == len(rows)
        startup_s = self.startup.seconds if self.startup and not self.startup.error else None

        def each(value) -> list:
            return [value(n, r) for n, r in zip(rows, self.runs)] if done else [None] * len(rows)

        def steady(n: int, r: CurateRun) -> float | None:
            rate = steady_rate(n, r.seconds, startup_s) if startup_s else None
            return rate and round(rate, 1)

        out = {
            "commit": self.commit,
            "curate_file": self.curate_file,
            "rows": rows,
            "driver_peak_rss_mb": each(lambda n, r: round(r.driver_peak_mb, 1)),
            "process_tree_peak_rss_mb": each(lambda n, r: round(r.peak_tree_mb, 1)),
            "seconds": each(lambda n, r: round(r.seconds, 2)),
            "images_per_s": each(lambda n, r: round(n / r.seconds, 1)),
            "startup_seconds": startup_s and round(startup_s, 2),
            "steady_images_per_s": each(steady),
            "selected": each(lambda n, r: r.summary["selected"]),
            "rss_growth_mb": None,
            "rss_growth_ratio": None,
            "error": self.error,
        }
        if done:
            growth = out["driver_peak_rss_mb"][1] - out["driver_peak_rss_mb"][0]
            out["rss_growth_mb"] = round(growth, 1)
            out["rss_growth_ratio"] = round(growth / added_vector_mb(rows), 3)
        return out


def short_error(error: str) -> str:
    """`exit N: <message>`: the first line (exit status or timeout) and the last message
    of stderr (a traceback's last line, or curate's own `error: ...`, wrapped or not)."""
    head, *lines = [line.strip() for line in error.strip().splitlines()] or [""]
    lines = [line for line in lines if line]
    marks = [i for i, line in enumerate(lines)
             if line.startswith("error:") or "Error" in line or "Exception" in line]
    start = marks[-1] if marks else max(len(lines) - 2, 0)
    message = " ".join(lines[start:])
    return f"{head} {message[:300]}".strip()


def added_vector_mb(rows: list[int]) -> float:
    return (rows[1] - rows[0]) * DIM * 4 / 1e6


def funnel_line(run: CurateRun) -> str:
    stages = {s["type"]: s for s in run.summary["stages"]}
    dropped = ", ".join(f"{name} -{stages[name]['dropped']}"
                        for name in ("image_quality", "exact_dedup", "phash_dedup",
                                     "semantic_dedup", "diversity_sample") if name in stages)
    return f"{dropped}; {run.summary['selected']} selected"


def table(sides: list[Side], rows: list[int]) -> str:
    def cell(value, fmt="{:,.1f}"):
        return "-" if value is None else fmt.format(value)

    lines = [f"{'':10} {'rows':>7} {'seconds':>8} {'images/s':>9} {'steady/s':>9} "
             f"{'driver MB':>10} {'tree MB':>9}"]
    for side in sides:
        fig = side.figures(rows)
        for i, n in enumerate(rows):
            lines.append(
                f"{side.name:10} {n:>7,} {cell(fig['seconds'][i], '{:,.1f}'):>8} "
                f"{cell(fig['images_per_s'][i]):>9} {cell(fig['steady_images_per_s'][i]):>9} "
                f"{cell(fig['driver_peak_rss_mb'][i], '{:,.0f}'):>10} "
                f"{cell(fig['process_tree_peak_rss_mb'][i], '{:,.0f}'):>9}")
        lines.append(
            f"{'':10} start-up {cell(fig['startup_seconds'])} s; driver growth "
            f"{cell(fig['rss_growth_mb'], '{:,.0f}')} MB for "
            f"{added_vector_mb(rows):,.0f} MB of added vectors "
            f"(ratio {cell(fig['rss_growth_ratio'], '{:.3f}')}, target < 0.25)"
            + (f"; FAILED: {side.error}" if side.error else ""))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000, help="N: runs at N and 8N rows")
    parser.add_argument("--previous", default="1ed4231",
                        help="commit of the previous release (default: the release before "
                        "the streaming rewrite)")
    parser.add_argument("--skip-previous", action="store_true")
    parser.add_argument("--previous-executor", choices=["ray", "local", "auto"], default=None,
                        help="the previous release's run.executor (default: unset, for "
                        "releases before it, which always ran on Ray)")
    parser.add_argument("--executor", choices=["ray", "local", "auto"], default="ray",
                        help="this checkout's run.executor (default ray: the driver of a "
                        "distributed run is what is measured)")
    parser.add_argument("--image-size", default="96x96", help="WIDTHxHEIGHT of the photos")
    parser.add_argument("--run-timeout", type=float, default=1800.0,
                        help="seconds after which a `curate run` is stopped and reported "
                        "as failed")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="inputs, model and stores (default: a temporary directory)")
    args = parser.parse_args()
    from curate.models.tiny import build_clip

    rows = [args.rows, 8 * args.rows]
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-bench-scale-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = stand_in_model(workdir, "clip", "wide", build_clip)
    write = functools.partial(write_small_photos, exact_copies=EXACT_COPIES,
                              near_copies=NEAR_COPIES)
    corpus, big, small, (width, height) = photo_inputs(
        workdir, rows[1], args.image_size, 16, write=write,
        name=f"photos-{args.image_size}-{rows[1]}")
    folders = [first_rows(corpus, rows[0], workdir / f"photos-{args.image_size}-{rows[0]}-of-"
                          f"{rows[1]}"), big]
    print(f"inputs: {rows[1]:,} JPEGs of {width}x{height} "
          f"({sum(p.stat().st_size for p in corpus) / 1e6:.0f} MB; about "
          f"{EXACT_COPIES:.0%} byte copies, {NEAR_COPIES:.0%} re-encoded copies), the first "
          f"{rows[0]:,} of them as the N corpus; stand-in CLIP with {DIM}-d embeddings; "
          f"{os.cpu_count()} CPUs; in {workdir} [{time.perf_counter() - started:.0f} s to "
          "make]", flush=True)

    dirty = " with uncommitted changes to curate/" if git("status", "--porcelain", "--",
                                                         "curate") else ""
    sides = [Side("current", ROOT, f"working tree at {git('rev-parse', '--short', 'HEAD')}"
                                   f"{dirty}")]
    worktree = None
    try:
        if not args.skip_previous:
            worktree, commit = add_worktree(args.previous)
            sides.append(Side("previous", worktree, commit))
        def config_for_side(side: Side):
            executor = args.executor if side.name == "current" else args.previous_executor
            return functools.partial(pipeline_config, model_dir=model_dir, executor=executor)

        for side in sides:
            config_for = config_for_side(side)
            # not counted: the first run from a checkout compiles its bytecode and reads
            # everything from disk once
            warm = curate_run(config_for(small, workdir / f"{side.name}-store_warmup"),
                              workdir, f"{side.name}-warmup", side.checkout, args.run_timeout)
            if side.check(warm, "warm-up run"):
                print(f"{side.name}: curate imported from {warm.curate_file}; warm-up run "
                      f"(not counted) {warm.seconds:.1f} s", flush=True)
        for side in sides:
            if side.error:
                continue
            side.startup = startup_run(config_for_side(side), small, workdir, side.checkout,
                                       tag=f"{side.name}-", timeout_s=args.run_timeout)
            side.check(side.startup, "start-up run")
        for n, folder in zip(rows, folders):
            for side in sides:
                if side.error:
                    continue
                run = curate_run(config_for_side(side)(folder,
                                                       workdir / f"{side.name}-store_{n}"),
                                 workdir, f"{side.name}-{n}", side.checkout,
                                 args.run_timeout)
                side.runs.append(run)
                seen = run.summary and run.summary.get("rows_total")
                if seen is not None and seen != n:
                    run.error = f"the run's table has {seen:,} rows, not {n:,}"
                if side.check(run, f"run on {n:,} rows"):
                    print(f"{side.name}: {n:,} rows in {run.seconds:.1f} s "
                          f"({n / run.seconds:.1f} images/s), driver peak "
                          f"{run.driver_peak_mb:,.0f} MB (process tree "
                          f"{run.peak_tree_mb:,.0f} MB); {funnel_line(run)}", flush=True)
    finally:
        if worktree is not None:
            remove_worktree(worktree)

    print()
    print(table(sides, rows))
    known = [f"{ISSUE_BASELINE[n]:,} MB at {n:,}" for n in rows if n in ISSUE_BASELINE]
    if known:
        print(f"issue's figures for the previous release (driver peak): {', '.join(known)}")
    current = sides[0].figures(rows)
    previous = sides[1].figures(rows) if len(sides) > 1 else None
    ratio = None
    if previous and current["images_per_s"][1] and previous["images_per_s"][1]:
        ratio = round(current["images_per_s"][1] / previous["images_per_s"][1], 3)
    result = {
        "rows": rows,
        "image_size": f"{width}x{height}",
        "embedding_dim": DIM,
        "cpus": os.cpu_count(),
        **{k: v for k, v in current.items() if k != "rows"},
        "previous": previous,
        "added_vector_mb": round(added_vector_mb(rows), 1),
        "throughput_ratio_8n": ratio,
        "targets": {"rss_growth_ratio": "< 0.25", "throughput_ratio_8n": ">= 1.0"},
    }
    print(json.dumps(result))
    if any(side.error for side in sides):
        sys.exit(1)


if __name__ == "__main__":
    main()
