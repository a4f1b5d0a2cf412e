"""Semantic dedup at scale: curate's `semantic_dedup` stage (its global part, on an Arrow
table over a memory-mapped array) against a plain faiss/numpy implementation of the same
algorithm (k-means on all rows, a full similarity matrix per cluster, np.triu).

    python benchmarks/semantic_dedup.py --n 1000000 --dim 512 --eps 0.05

The embeddings are synthetic but shaped like real ones: a mixture of a few thousand
Gaussian components around a shared direction (cosine within a component about 0.55,
between components about 0.1), plus planted near-copy groups (5% of rows are copies of a
base row with small noise; every pair of a group is within eps). Ground truth: the pairs
inside the planted groups whose exact cosine is above 1 - eps. Predicted pairs: the pairs
inside each predicted group (a kept row and the rows pointing at it).

Each side runs in its own process, so each reports its own peak RSS (ru_maxrss; pages of
the memory-mapped input count once touched). The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHUNK = 65_536
MAX_PAIRS = 50_000_000  # refuse to enumerate more predicted pairs than this


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# --- data -------------------------------------------------------------------------------------


def generate(path: Path, n: int, dim: int, eps: float, components: int, dup_fraction: float,
             seed: int) -> dict:
    """Write n unit float32 rows to `path` (.npy, chunk by chunk) and the planted groups to
    `path`.groups.npy (group id per row, -1 outside groups)."""
    rng = np.random.default_rng(seed)
    shared = unit(rng.standard_normal(dim))
    centers = unit(0.5 * shared + unit(rng.standard_normal((components, dim))))
    centers = centers.astype(np.float32)
    weights = rng.lognormal(0.0, 1.0, components)
    cdf = np.cumsum(weights) / weights.sum()
    spread = math.sqrt(0.8 / dim)

    def mixture(count: int) -> np.ndarray:
        comp = np.minimum(np.searchsorted(cdf, rng.random(count)), components - 1)
        out = centers[comp] + spread * rng.standard_normal((count, dim), dtype=np.float32)
        out /= np.linalg.norm(out, axis=1, keepdims=True)
        return out

    # planted groups: a base row and 1 to 4 copies; copies make up dup_fraction of the rows
    copies_wanted = round(dup_fraction * n)
    draws = rng.integers(1, 5, copies_wanted + 1)
    count = int(np.searchsorted(np.cumsum(draws), copies_wanted)) + 1 if copies_wanted else 0
    sizes = draws[:count].tolist()
    if sizes:
        sizes[-1] -= sum(sizes) - copies_wanted
    groups = len(sizes)
    in_groups = groups + sum(sizes)
    if in_groups > n:
        raise SystemExit("--dup-fraction too large for --n")
    slots = rng.permutation(n)[:in_groups]
    group_of = np.full(n, -1, dtype=np.int32)
    is_copy = np.zeros(n, dtype=bool)
    group_of[slots[:groups]] = np.arange(groups, dtype=np.int32)
    copy_rows = slots[groups:]
    group_of[copy_rows] = np.repeat(np.arange(groups, dtype=np.int32), sizes)
    is_copy[copy_rows] = True
    bases = mixture(groups) if groups else np.zeros((0, dim), np.float32)
    # squared noise norm between 0.1 and 0.4 eps: every pair of a group is within 0.4 eps
    delta = np.sqrt(rng.uniform(0.1, 0.4, n) * eps).astype(np.float32)

    x = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in range(0, n, CHUNK):
        end = min(start + CHUNK, n)
        block = mixture(end - start)
        local = np.flatnonzero(group_of[start:end] >= 0)
        if local.size:
            rows = start + local
            planted = bases[group_of[rows]].copy()
            copies = is_copy[rows]
            noise = unit(rng.standard_normal((int(copies.sum()), dim))).astype(np.float32)
            planted[copies] += delta[rows[copies], None] * noise
            block[local] = unit(planted)
        x[start:end] = block
    x.flush()
    del x
    np.save(str(path) + ".groups.npy", group_of)
    # what "looks like real data" means here, measured on a sample
    sample = mixture(4000)
    sims = sample[:2000] @ sample[2000:].T
    return {"groups": groups, "planted_copies": int(is_copy.sum()),
            "cosine_random_pairs_mean": float(sims.mean()),
            "cosine_random_pairs_max": float(sims.max())}


def true_pairs(x: np.ndarray, group_of: np.ndarray, eps: float) -> np.ndarray:
    """Pairs (as a*n + b, a < b) inside planted groups with exact cosine > 1 - eps."""
    n = len(group_of)
    rows = np.flatnonzero(group_of >= 0)
    rows = rows[np.argsort(group_of[rows], kind="stable")]
    cut = np.flatnonzero(np.r_[True, np.diff(group_of[rows]) != 0, True])
    found = []
    lengths = np.diff(cut)
    for size in np.unique(lengths):
        starts = cut[:-1][lengths == size]
        members = rows[starts[:, None] + np.arange(size)]  # (groups, size)
        v = np.asarray(x[members.ravel()], dtype=np.float64).reshape(*members.shape, -1)
        sims = np.einsum("gid,gjd->gij", v, v)
        a, b = np.triu_indices(size, 1)
        hit = sims[:, a, b] > 1 - eps
        lo = np.minimum(members[:, a], members[:, b])[hit]
        hi = np.maximum(members[:, a], members[:, b])[hit]
        found.append(lo.astype(np.int64) * n + hi)
    return np.unique(np.concatenate(found)) if found else np.zeros(0, np.int64)


def predicted_pairs(duplicate_of: np.ndarray) -> np.ndarray:
    """Pairs (as a*n + b, a < b) inside each predicted group: kept row + its duplicates."""
    n = len(duplicate_of)
    dup = np.flatnonzero(duplicate_of >= 0)
    root = np.arange(n)
    root[dup] = duplicate_of[dup]
    members = np.unique(np.r_[dup, duplicate_of[dup]])
    members = members[np.argsort(root[members], kind="stable")]
    cut = np.flatnonzero(np.r_[True, np.diff(root[members]) != 0, True])
    lengths = np.diff(cut)
    total = int((lengths * (lengths - 1) // 2).sum())
    if total > MAX_PAIRS:
        raise SystemExit(f"{total:,} predicted pairs: groups are far too large")
    out = []
    for size in np.unique(lengths):
        starts = cut[:-1][lengths == size]
        group = np.sort(members[starts[:, None] + np.arange(size)], axis=1)
        a, b = np.triu_indices(size, 1)
        out.append((group[:, a].astype(np.int64) * n + group[:, b]).ravel())
    return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)


def pair_scores(predicted: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    both = np.intersect1d(predicted, truth, assume_unique=True).size
    precision = both / predicted.size if predicted.size else 1.0
    recall = both / truth.size if truth.size else 1.0
    return precision, recall


# --- the two sides (each in its own process) ---------------------------------------------------


def run_curate(npy: Path, out: Path, eps: float, clusters: int, seed: int) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    from curate.stages.table.semantic_dedup import SemanticDedup

    x = np.load(npy, mmap_mode="r")
    n, dim = x.shape
    values = pa.Array.from_buffers(pa.float32(), n * dim, [None, pa.py_buffer(x)])
    vectors = pa.FixedSizeListArray.from_arrays(values, dim)  # zero-copy over the file
    # sample ids in no particular row order (as in a real table), each naming a row number
    number = np.random.default_rng(seed).permutation(n)
    ids = pa.array(np.char.zfill(number.astype("U12"), 12))
    table = pa.table({"sample_id": ids, "clip_embedding": vectors})
    alive = pa.array(np.ones(n, dtype=bool))
    stage = SemanticDedup(eps=eps, clusters=clusters, seed=seed)
    started, cpu = time.perf_counter(), cpu_seconds()
    result = stage.run_global(table, alive)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    verdict = pc.fill_null(pc.cast(result["semantic_duplicate_of"], pa.int64()), -1).to_numpy()
    row_of_number = np.argsort(number)
    keeper = np.where(verdict >= 0, row_of_number[np.maximum(verdict, 0)], -1)
    np.save(str(out) + ".npy", keeper)
    out.write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu,
                               "peak_rss_mb": peak_rss_mb(), "report": stage.report}))


def run_baseline(npy: Path, out: Path, eps: float, clusters: int, seed: int,
                 max_matrix_gb: float) -> None:
    """SemDeDup written the plain way: all rows in memory, faiss k-means trained on the whole
    array, one full similarity matrix per cluster. Clusters whose matrices would pass
    `max_matrix_gb` are skipped (and counted) instead of exhausting memory."""
    import faiss

    started_load = time.perf_counter()
    x = np.load(npy)
    load_seconds = time.perf_counter() - started_load
    n, dim = x.shape
    started, cpu = time.perf_counter(), cpu_seconds()
    km = faiss.Kmeans(dim, clusters, niter=20, seed=seed, spherical=True, verbose=False)
    km.train(x)
    _, nearest = km.index.search(x, 1)
    labels = nearest[:, 0]
    to_centroid = np.einsum("ij,ij->i", x, km.centroids[labels])
    duplicate_of = np.full(n, -1, dtype=np.int64)
    skipped_clusters = skipped_rows = 0
    for c in range(clusters):
        members = np.flatnonzero(labels == c)
        m = len(members)
        if m < 2:
            continue
        if 3 * 4 * m * m > max_matrix_gb * 1e9:  # float32 matrix, its triu copy, a mask
            skipped_clusters += 1
            skipped_rows += m
            continue
        order = members[np.argsort(-to_centroid[members], kind="stable")]  # closest first
        e = x[order]
        sims = np.triu(e @ e.T, k=1)
        is_dup = sims.max(axis=0) > 1 - eps
        first = np.argmax(sims > 1 - eps, axis=0)
        for j in np.flatnonzero(is_dup):
            keeper = order[first[j]]
            duplicate_of[order[j]] = (
                keeper if duplicate_of[keeper] < 0 else duplicate_of[keeper])
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    np.save(str(out) + ".npy", duplicate_of)
    out.write_text(json.dumps({
        "seconds": seconds, "cpu_seconds": cpu, "load_seconds": load_seconds,
        "peak_rss_mb": peak_rss_mb(),
        "largest_cluster": int(np.bincount(labels).max()),
        "skipped_clusters": skipped_clusters, "skipped_rows": skipped_rows,
    }))


def child(role: str, npy: Path, out: Path, args) -> dict:
    command = [sys.executable, __file__, "--role", role, "--npy", str(npy), "--out", str(out),
               "--eps", str(args.eps), "--clusters", str(args.clusters),
               "--seed", str(args.seed), "--baseline-max-gb", str(args.baseline_max_gb)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"{role} side failed (exit {done.returncode})")
    result = json.loads(out.read_text())
    result["duplicate_of"] = np.load(str(out) + ".npy")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=100_000, help="rows")
    parser.add_argument("--dim", type=int, default=512, help="embedding dimension")
    parser.add_argument("--eps", type=float, default=0.05, help="cosine distance threshold")
    parser.add_argument("--clusters", type=int, default=None,
                        help="k-means clusters for both sides (default: the stage's automatic "
                        "choice, about sqrt(n))")
    parser.add_argument("--components", type=int, default=3000, help="mixture components")
    parser.add_argument("--dup-fraction", type=float, default=0.05,
                        help="fraction of rows that are planted copies")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--baseline-max-gb", type=float, default=6.0,
                        help="largest per-cluster matrices the baseline may build")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the .npy goes (default: a temporary directory)")
    parser.add_argument("--role", choices=["curate", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--npy", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "curate":
        run_curate(args.npy, args.out, args.eps, args.clusters, args.seed)
        return
    if args.role == "baseline":
        run_baseline(args.npy, args.out, args.eps, args.clusters, args.seed,
                     args.baseline_max_gb)
        return

    from curate.stages.table._embedding import auto_clusters

    if args.clusters is None:
        args.clusters = auto_clusters(args.n)
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        npy = work / "embeddings.npy"
        started = time.perf_counter()
        data = generate(npy, args.n, args.dim, args.eps, min(args.components, args.n),
                        args.dup_fraction, args.seed)
        print(f"generated {args.n:,} x {args.dim} float32 "
              f"({args.n * args.dim * 4 / 1e9:.2f} GB) in {time.perf_counter() - started:.1f} s: "
              f"{data['groups']:,} planted groups, {data['planted_copies']:,} copies; cosine "
              f"of random pairs: mean {data['cosine_random_pairs_mean']:.2f}, "
              f"max {data['cosine_random_pairs_max']:.2f}", flush=True)
        x = np.load(npy, mmap_mode="r")
        truth = true_pairs(x, np.load(str(npy) + ".groups.npy"), args.eps)

        ours = child("curate", npy, work / "curate.json", args)
        precision, recall = pair_scores(predicted_pairs(ours["duplicate_of"]), truth)
        found = int((ours["duplicate_of"] >= 0).sum())
        print(f"curate semantic_dedup: {ours['seconds']:.1f} s ({ours['cpu_seconds']:.1f} s "
              f"CPU), peak RSS "
              f"{ours['peak_rss_mb']:,.0f} MB, {found:,} duplicates, pair precision "
              f"{precision:.4f}, recall {recall:.4f} ({truth.size:,} true pairs); "
              f"report {ours['report']}", flush=True)
        summary = {
            "n": args.n, "dim": args.dim, "eps": args.eps, "clusters": args.clusters,
            "seconds": round(ours["seconds"], 2), "cpu_seconds": round(ours["cpu_seconds"], 2),
            "peak_rss_mb": round(ours["peak_rss_mb"], 1),
            "pair_precision": round(precision, 5), "pair_recall": round(recall, 5),
            "duplicates_found": found, "planted_copies": data["planted_copies"],
            "true_pairs": int(truth.size),
        }
        if not args.skip_baseline:
            base = child("baseline", npy, work / "baseline.json", args)
            b_precision, b_recall = pair_scores(predicted_pairs(base["duplicate_of"]), truth)
            b_found = int((base["duplicate_of"] >= 0).sum())
            bounded = base["skipped_clusters"] > 0
            print(f"baseline (faiss + full per-cluster matrices): {base['seconds']:.1f} s "
                  f"({base['cpu_seconds']:.1f} s CPU; +{base['load_seconds']:.1f} s loading), "
                  f"peak RSS "
                  f"{base['peak_rss_mb']:,.0f} MB, {b_found:,} duplicates, pair precision "
                  f"{b_precision:.4f}, recall {b_recall:.4f}; largest cluster "
                  f"{base['largest_cluster']:,}" + (
                      f"; BOUNDED: skipped {base['skipped_clusters']} clusters "
                      f"({base['skipped_rows']:,} rows) whose matrices would pass "
                      f"{args.baseline_max_gb} GB, so its time is a lower bound"
                      if bounded else ""), flush=True)
            summary.update({
                "baseline_seconds": round(base["seconds"], 2),
                "baseline_cpu_seconds": round(base["cpu_seconds"], 2),
                "baseline_peak_rss_mb": round(base["peak_rss_mb"], 1),
                "baseline_pair_precision": round(b_precision, 5),
                "baseline_pair_recall": round(b_recall, 5),
                "baseline_duplicates_found": b_found,
                "baseline_bounded": bounded,
                "baseline_skipped_rows": base["skipped_rows"],
                "ratio": round(base["seconds"] / ours["seconds"], 2),
            })
            print(f"baseline / curate: time {summary['ratio']:.2f}x, peak RSS "
                  f"{base['peak_rss_mb'] / ours['peak_rss_mb']:.2f}x", flush=True)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
