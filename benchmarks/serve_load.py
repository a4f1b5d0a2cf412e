"""Latency and throughput of the hosting layer under a bounded load on loopback.

A table of photo-like 1024x768 JPEGs is curated (ingest, image_quality, clip_embed with the
tiny stand-in CLIP), `curate serve`'s application is started on it, and N requests at C
concurrent connections go to `GET /samples/{id}` (random ids) and `GET /search?text=`.
The baseline, measured in the same run, is the raw library call the route wraps, in a
plain single-process loop: the LanceDB lookup of one row by id, and the CLIP text tower
plus the LanceDB vector search. `/health` under the same load shows what Serve's HTTP path
itself costs per request (the ceiling of any route), and `/samples/{id}` is also measured
at 8 concurrent connections and one at a time.

    python benchmarks/serve_load.py --images 1000 --requests 2000 [--ingress haproxy]

`/samples/{id}` is loaded at 8, 32 and 128 concurrent connections (`--levels`). With
`--ingress haproxy` Serve's HAProxy ingress with direct ingress replaces its Python
proxy (`ingress.mode` of the serve config). The model deployment has `min_replicas: 0`:
the first text search waits for a replica to start (cold start), the deployment scales
back to zero when idle, and the first search after that is timed again.

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

from benchmarks.common import (  # noqa: E402
    free_port,
    photo_inputs,
    run_curate,
    stand_in_model,
)

TEXTS = ["a rocket on the launch pad", "a cup of coffee", "an orange flower", "a cat",
         "a pagoda by the lake", "stars in deep space", "a person with a camera"]


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
    parser.add_argument("--concurrency", type=int, default=32, help="for /search")
    parser.add_argument("--levels", default="8,32,128",
                        help="concurrent connections for /samples/{id}")
    parser.add_argument("--ingress", choices=("proxy", "haproxy"), default="proxy")
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

    from curate.catalog import Catalog
    from curate.config import StoreConfig
    from curate.models.embedders import load_embedder
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

    levels = [int(n) for n in args.levels.split(",")]
    started = time.perf_counter()
    cfg = load_serve_config({
        "store": {"uri": str(store)}, "port": free_port(), "limits": {"requests_per_second": None},
        "ingress": {"replicas": args.replicas, "cpus": 0.1, "mode": args.ingress},
        "default_model": {"cpus": 0.5, "max_batch_size": 16,
                          "autoscaling": {"min_replicas": 0, "max_replicas": 1,
                                          "downscale_delay_s": 5}},
    })
    base = start(cfg)  # starts the local Ray too
    load(base, ["/health"], 1)
    startup_s = time.perf_counter() - started
    try:
        cold = load(base, search_paths[:1], 1)["max_ms"]  # no model replica yet
        load(base, sample_paths[:100] + search_paths[:50], 8)  # warm: connections, caches
        samples = {n: load(base, sample_paths, n) for n in levels}
        search = load(base, search_paths, args.concurrency)
        # Serve's own cost per request: a route that does nothing (the ceiling of any route)
        ceiling = load(base, ["/health"] * args.requests, max(levels))
        single = load(base, sample_paths[:500], 1)
        idle_s = wait_for_zero_replicas()
        cold_after_idle = load(base, search_paths[:1], 1)["max_ms"]
    finally:
        stop()
    middle = samples[32] if 32 in samples else samples[levels[0]]
    result = {
        "images": args.images, "ingress": args.ingress, "replicas": args.replicas,
        "startup_seconds": round(startup_s, 2),
        **{f"samples_by_id_at_{n}": r for n, r in samples.items()},
        "search": search, "health_ceiling": ceiling, "samples_by_id_at_1": single,
        "raw_lookup_per_s": round(raw_lookup, 1), "raw_search_per_s": round(raw_search, 1),
        "samples_ratio_vs_raw": round(middle["rps"] / raw_lookup, 3),
        "search_ratio_vs_raw": round(search["rps"] / raw_search, 3),
        "model_cold_start_ms": cold, "scaled_to_zero_after_s": idle_s,
        "model_cold_start_after_idle_ms": cold_after_idle,
        "errors": sum(r["errors"] for r in samples.values()) + search["errors"],
        "samples_p99_at_32_under_100ms": middle["p99_ms"] < 100,
    }
    print(json.dumps(result))


def wait_for_zero_replicas(timeout_s: float = 120) -> float | None:
    """Seconds until every model deployment of the app runs no replica (None: never)."""
    from ray import serve

    started = time.perf_counter()
    while time.perf_counter() - started < timeout_s:
        app = serve.status().applications["curate"]
        models = [d for name, d in app.deployments.items() if name.startswith("model-")]
        if models and all(sum(d.replica_states.values()) == 0 for d in models):
            return round(time.perf_counter() - started, 1)
        time.sleep(0.5)
    return None


if __name__ == "__main__":
    main()
