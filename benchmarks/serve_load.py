"""Latency and throughput of the hosting layer under a bounded load on loopback.

A table of photo-like 1024x768 JPEGs is curated (ingest, image_quality, clip_embed with the
tiny stand-in CLIP), `curate serve`'s application is started on it, and N requests at C
concurrent connections go to `GET /samples/{id}` (random ids) and `GET /search?text=`.
The baseline, measured in the same run, is the raw library call the route wraps, in a
plain single-process loop: the LanceDB lookup of one row by id, and the CLIP text tower
plus the LanceDB vector search. `/health` under the same load shows what Serve's HTTP path
itself costs per request (the ceiling of any route), and `/samples/{id}` is also measured
at 8 concurrent connections and one at a time.

    python benchmarks/serve_load.py --images 1000 --requests 2000 --concurrency 32

The rate limit is off for the load (one client address sends everything). The last line
printed is a JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import quote, urlparse

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import photo_inputs, run_curate, stand_in_model  # noqa: E402

TEXTS = ["a rocket on the launch pad", "a cup of coffee", "an orange flower", "a cat",
         "a pagoda by the lake", "stars in deep space", "a person with a camera"]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def load(base: str, paths: list[str], concurrency: int) -> dict:
    """GET every path, `concurrency` keep-alive connections at once."""
    url = urlparse(base)
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    queue = iter(enumerate(paths))

    def worker():
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        while True:
            with lock:
                item = next(queue, None)
            if item is None:
                break
            started = time.perf_counter()
            try:
                conn.request("GET", item[1])
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
                reason = f"HTTP {response.status}"
            except (OSError, http.client.HTTPException) as exc:
                ok, reason = False, repr(exc)
                conn.close()
                conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
            took = time.perf_counter() - started
            with lock:
                latencies.append(took)
                if not ok:
                    errors.append(reason)
        conn.close()

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    return {"requests": len(paths), "errors": len(errors), "error_kinds": sorted(set(errors)),
            "seconds": round(wall, 2), "rps": round(len(paths) / wall, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "max_ms": round(float(ms.max()), 2)}


def raw_loop(n: int, call) -> float:
    """Calls per second of `call(i)` in a plain loop."""
    started = time.perf_counter()
    for i in range(n):
        call(i)
    return n / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--image-size", default="1024x768")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--replicas", type=int, default=1, help="ingress replicas")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) /
                        "curate-bench-serve")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)

    from curate.models.tiny import build_clip

    model = stand_in_model(args.workdir, "clip", "tiny", build_clip)
    _, media, _, _ = photo_inputs(args.workdir, args.images, args.image_size, 4)
    store = args.workdir / "store"
    config = {"name": "serve-bench", "store": {"uri": str(store)},
              "stages": [{"type": "ingest_images", "paths": [str(media)]},
                         {"type": "image_quality"},
                         {"type": "clip_embed", "model": str(model)}]}
    curate_s, _, _ = run_curate(config, args.workdir, "serve-bench")
    print(f"table of {args.images} photos curated in {curate_s:.1f} s", file=sys.stderr)

    from curate.config import StoreConfig
    from curate.models.embedders import load_embedder
    from curate.runner import connect
    from curate.serve.catalog import Catalog
    from curate.serve.config import load_serve_config
    from curate.serve.server import start, stop

    catalog = Catalog(StoreConfig(uri=str(store)))
    ids = catalog.samples(limit=args.images, columns=["sample_id"])["rows"]
    ids = [r["sample_id"] for r in ids]
    rng = random.Random(0)
    sample_paths = [f"/samples/{rng.choice(ids)}" for _ in range(args.requests)]
    search_paths = [f"/search?k=20&text={quote(rng.choice(TEXTS))}"
                    for _ in range(args.requests)]

    # baselines: the raw library calls in one process
    lookups = [rng.choice(ids) for _ in range(args.requests)]
    raw_lookup = raw_loop(args.requests, lambda i: catalog.sample(lookups[i]))
    embedder = load_embedder("transformers", str(model))
    raw_search = raw_loop(min(args.requests, 500), lambda i: catalog.search(
        embedder.embed_texts([TEXTS[i % len(TEXTS)]])[0], 20))

    started = time.perf_counter()
    connect()
    ray_s = time.perf_counter() - started
    cfg = load_serve_config({
        "store": {"uri": str(store)}, "port": free_port(), "limits": {"requests_per_second": None},
        "ingress": {"replicas": args.replicas, "cpus": 0.1},
        "default_model": {"cpus": 0.5, "max_batch_size": 16,
                          "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    })
    base = start(cfg)
    load(base, ["/health"], 1)
    startup_s = time.perf_counter() - started
    try:
        load(base, sample_paths[:100] + search_paths[:50], 8)  # warm: connections, caches
        samples = load(base, sample_paths, args.concurrency)
        search = load(base, search_paths, args.concurrency)
        # Serve's own cost per request: a route that does nothing (the ceiling of any route)
        ceiling = load(base, ["/health"] * args.requests, args.concurrency)
        low = load(base, sample_paths, 8)
        single = load(base, sample_paths[:500], 1)
    finally:
        stop()
    result = {
        "images": args.images, "concurrency": args.concurrency, "replicas": args.replicas,
        "startup_seconds": round(startup_s, 2), "ray_start_seconds": round(ray_s, 2),
        "samples_by_id": samples, "search": search, "health_ceiling": ceiling,
        "samples_by_id_at_8": low, "samples_by_id_at_1": single,
        "raw_lookup_per_s": round(raw_lookup, 1), "raw_search_per_s": round(raw_search, 1),
        "samples_ratio_vs_raw": round(samples["rps"] / raw_lookup, 3),
        "search_ratio_vs_raw": round(search["rps"] / raw_search, 3),
        "errors": samples["errors"] + search["errors"],
        "samples_p99_under_100ms": samples["p99_ms"] < 100,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
