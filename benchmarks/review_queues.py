"""Review-queue pages served from a table of 10^6 rows, and what reading whole columns
would cost instead.

The demo pipeline runs once on examples/media (a real run record: config, limits, dedup
stages). Its table is then replaced by N synthetic rows shaped like it (no media decode):
the demo's rows repeated with new sample ids, scores drawn around the demo's, one row in
twenty a pHash or semantic copy of another (a few bits or a little noise away), one in
three selected. The run record gains the histograms of the new rows and the indexes a
run makes (curate.queues.index_columns). `curate serve`'s application is started on it and
pages of each kind of queue are requested over HTTP, one at a time, at random depths (0 to
480 rows deep, 48 a page, the gallery's page):

- threshold: `threshold:nsfw_score:nsfw_score:max` (a band of nsfw_score, indexed);
- disagree: `disagree:aesthetic_score:nsfw_score` (a box of two indexed scores);
- duplicates: `duplicates:phash_dedup` (every copy read once per table version, at the
  first request; later pages come from what it kept);
- near: `near:semantic_dedup` (rows whose nearest lies just past eps: a band of the
  indexed `semantic_nearest_distance`);
- audit: `audit` at random seeds (a range of sample ids, indexed);
- what-if: `GET /whatif/threshold:nsfw_score:nsfw_score:max?value=` with the value drawn
  anywhere in the scores' range (its band, between the two limits, up to the whole
  column), against the plain way: the columns read whole, the moved limit applied; and
  the same with `&funnel=true` (the band's `reject_reason` read as well).

The first page of each queue after start-up is printed apart (`first_ms`: indexes
opened, the copies scanned). The baseline, in the same process, is the same page computed
the plain way: the whole score columns read (sample_id with them), ordered in NumPy, the
page's rows fetched by id.
`/health` under the same client shows what Serve's HTTP path costs per request. The
ratio printed is the baseline's p50 over the queue's p50 (over HTTP).

    python benchmarks/review_queues.py --rows 125000,1000000 --requests 100

The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import quote, urlparse

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.common import free_port, run_curate  # noqa: E402

CHUNK = 100_000
COPY_EVERY = 20
PAGE = 48
EPS = 0.01  # configs/demo.yaml's semantic_dedup eps
CARD_COLUMNS = "uri,selected,reject_reason,content_hash,error"


def demo_table(workdir: Path) -> Path:
    import yaml

    config = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    config["store"]["uri"] = str(workdir / "store")
    seconds, _, _ = run_curate(config, workdir, "demo")
    print(f"demo run: {seconds:.1f} s", flush=True)
    return workdir / "store"


def synthetic_chunk(demo, start: int, n: int, rng: np.random.Generator, ids: np.ndarray,
                    phash: np.ndarray):
    """Rows start..start+n: demo rows with new ids, scores near the demo's, copies."""
    import pyarrow as pa

    from curate.algos.vectors import from_matrix

    base = demo.take(pa.array(rng.integers(0, demo.num_rows, n)))
    mine = ids[start:start + n]
    columns = {"sample_id": pa.array(mine), "input_id": pa.array(mine),
               "uri": pa.array([f"s3://bench/{i:09d}.jpg" for i in range(start, start + n)])}
    for field in demo.schema:
        name = field.name
        if pa.types.is_floating(field.type) and name in demo.column_names:
            values = demo[name].to_numpy(zero_copy_only=False).astype(np.float64)
            ok = values[np.isfinite(values)]
            if not len(ok):
                continue
            spread = max(float(ok.std()), 1e-3)
            drawn = rng.choice(ok, n) + rng.normal(0, spread, n)
            columns[name] = pa.array(drawn.astype(np.float32))
    # one row in COPY_EVERY is a copy of a row before it
    copy = (np.arange(start, start + n) % COPY_EVERY == 3) & (np.arange(start, start + n) > 0)
    kept_index = (rng.random(n) * np.arange(start, start + n)).astype(np.int64)
    mine_phash = phash[start:start + n].copy()
    # a copy's pHash: its kept copy's with 0 to 12 bits flipped
    flips = np.zeros(n, np.uint64)
    for _ in range(12):
        bit = rng.integers(0, 64, n).astype(np.uint64)
        flips ^= np.where(rng.random(n) < 0.5, np.left_shift(np.uint64(1), bit), 0)
    mine_phash[copy] = phash[kept_index[copy]] ^ flips[copy]
    phash[start:start + n] = mine_phash
    columns["phash"] = pa.array(mine_phash)
    duplicate_of = np.where(copy, ids[kept_index], None)
    for name in ("phash_duplicate_of", "semantic_duplicate_of"):
        if name in demo.column_names:
            columns[name] = pa.array(duplicate_of.tolist(), pa.string())
    if "semantic_nearest" in demo.column_names:  # each row's nearest: a row before it
        columns["semantic_nearest"] = pa.array(ids[np.maximum(kept_index, 0)].tolist(),
                                               pa.string())
    if "clip_embedding" in demo.column_names:
        dim = demo.schema.field("clip_embedding").type.list_size
        vectors = rng.normal(size=(n, dim)).astype(np.float32)
        columns["clip_embedding"] = from_matrix(vectors)
    selected = rng.random(n) < 1 / 3
    columns["selected"] = pa.array(selected)
    columns["reject_reason"] = pa.array(np.where(selected, None, "bench: synthetic").tolist(),
                                        pa.string())
    out = base
    for name, values in columns.items():
        if name in out.column_names:
            out = out.set_column(out.column_names.index(name), name,
                                 values.cast(out.schema.field(name).type))
    return out


def build(store_path: Path, rows: int, seed: int = 0) -> dict:
    import lance
    import pyarrow as pa

    from curate import queues, stats
    from curate.config import StoreConfig
    from curate.plan import build_stages
    from curate.table.store import Store

    store = Store(StoreConfig(uri=str(store_path)))
    demo = store.read()
    rng = np.random.default_rng(seed)
    ids = np.array([f"{x:032x}" for x in (int.from_bytes(rng.bytes(16), "big")
                                           for _ in range(rows))], object)
    phash = rng.integers(0, 2 ** 63, rows, dtype=np.int64).astype(np.uint64)
    started = time.perf_counter()
    path = str(store_path / "samples.lance")

    def chunks():
        for start in range(0, rows, CHUNK):
            yield from synthetic_chunk(demo, start, min(CHUNK, rows - start), rng,
                                       ids, phash).to_batches()

    reader = pa.RecordBatchReader.from_batches(demo.schema, chunks())
    lance.write_dataset(reader, path, mode="overwrite", max_rows_per_file=CHUNK)
    written = time.perf_counter() - started
    # what a run records and indexes at its end
    schema = store.schema()
    columns = stats.columns_for(schema)

    def each_fragment(fragments, fn, args):  # one fragment read at a time
        return [fn(f.to_table(columns=columns), *args) for f in fragments]

    recorded = stats.of_parts(list, each_fragment, store.dataset().get_fragments(), schema)
    last = store.runs()[-1]
    import yaml

    from curate.config import load_config
    stages = build_stages(load_config(yaml.safe_load(last["config_yaml"])))
    offered = queues.plan(stages, schema, recorded["histograms"])
    store.ensure_indexes(("sample_id", "input_id", *queues.index_columns(offered)))
    now = datetime.now(timezone.utc)
    store.save_run({**last, "run_id": f"bench-{rows}", "started_at": now, "finished_at": now,
                    "stats_json": json.dumps({**recorded, "bins": stats.BINS}),
                    "version_after": store.version(), "rows_total": rows})
    return {"rows": rows, "write_s": round(written, 1),
            "index_and_stats_s": round(time.perf_counter() - started - written, 1)}


def get(conn, path: str) -> float:
    started = time.perf_counter()
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    if response.status != 200:
        raise SystemExit(f"GET {path}: HTTP {response.status} {body[:300]!r}")
    return time.perf_counter() - started


def percentiles(seconds: list[float]) -> dict:
    ms = np.array(seconds) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "n": len(ms)}


def plain_page(dataset, kind: str, limit_at: float, offset: int, seed: int) -> list:
    """The page the plain way: whole columns read and ordered here, rows fetched by id."""
    import hashlib

    if kind == "threshold":
        t = dataset.to_table(columns=["sample_id", "nsfw_score"],
                             filter="nsfw_score IS NOT NULL")
        key = np.abs(t["nsfw_score"].to_numpy().astype(np.float64) - limit_at)
    elif kind == "disagree":
        t = dataset.to_table(columns=["sample_id", "aesthetic_score", "nsfw_score"],
                             filter="aesthetic_score IS NOT NULL AND nsfw_score IS NOT NULL")
        a = t["aesthetic_score"].to_numpy().astype(np.float64)
        b = t["nsfw_score"].to_numpy().astype(np.float64)
        ra, rb = np.argsort(np.argsort(a)) / len(a), np.argsort(np.argsort(b)) / len(b)
        key = -(ra - rb)
    elif kind == "near":
        t = dataset.to_table(columns=["sample_id", "semantic_nearest_distance"],
                             filter=f"semantic_nearest_distance > {limit_at}")
        key = t["semantic_nearest_distance"].to_numpy().astype(np.float64)
    else:
        t = dataset.to_table(columns=["sample_id"], filter="selected = true")
        start = int(hashlib.sha256(f"curate-audit:{seed}".encode()).hexdigest()[:8], 16)
        first = np.array([int(i[:8], 16) for i in t["sample_id"].to_pylist()], np.float64)
        key = (first - start) % 16 ** 8
    order = np.argsort(key, kind="stable")[offset:offset + PAGE]
    ids = [t["sample_id"][int(i)].as_py() for i in order]
    quoted = ", ".join(f"'{i}'" for i in ids)
    return dataset.to_table(columns=["sample_id", *CARD_COLUMNS.split(",")],
                            filter=f"sample_id IN ({quoted})").to_pylist()


def measure(store_path: Path, requests: int, seed: int = 1) -> dict:
    from curate.catalog import Catalog
    from curate.config import StoreConfig
    from curate.serve.config import load_serve_config
    from curate.serve.server import start, stop

    rng = random.Random(seed)
    base = start(load_serve_config({
        "store": {"uri": str(store_path)}, "port": free_port(), "ingress": {"cpus": 0},
        "default_model": {"cpus": 0.1, "autoscaling": {"min_replicas": 0}},
        "limits": {"requests_per_second": None},
        "search": {"index_min_rows": 10 ** 9}}))  # no ANN build: queues are measured
    url = urlparse(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=600)
    out: dict = {}
    try:
        out["health"] = percentiles([get(conn, "/health") for _ in range(requests)])
        names = {"threshold": "threshold:nsfw_score:nsfw_score:max",
                 "disagree": "disagree:aesthetic_score:nsfw_score",
                 "duplicates": "duplicates:phash_dedup", "near": "near:semantic_dedup",
                 "audit": "audit"}
        dataset = Catalog(StoreConfig(uri=str(store_path))).dataset()
        for kind, name in names.items():
            def path(offset, s, name=name):
                return (f"/queues/{quote(name)}?limit={PAGE}&offset={offset}&seed={s}"
                        f"&columns={CARD_COLUMNS}")
            # the first page after start-up: indexes opened, the copies scanned once
            record = {"first_ms": round(get(conn, path(0, 0)) * 1000, 1)}
            times, plain = [], []
            for _ in range(requests):
                offset, s = PAGE * rng.randrange(11), rng.randrange(10 ** 6)
                if kind == "audit":
                    offset = PAGE * rng.randrange(4)  # the audit sample is 200 rows
                times.append(get(conn, path(offset, s)))
                if kind != "duplicates" and len(plain) < max(5, requests // 10):
                    started = time.perf_counter()
                    plain_page(dataset, kind, EPS if kind == "near" else 0.8, offset, s)
                    plain.append(time.perf_counter() - started)
            record["served"] = percentiles(times)
            if plain:
                record["plain_whole_columns"] = percentiles(plain)
                record["ratio_p50"] = round(record["plain_whole_columns"]["p50_ms"]
                                            / record["served"]["p50_ms"], 1)
            out[kind] = record
            print(kind, json.dumps(record), flush=True)
        out["whatif"] = whatif(conn, dataset, requests, rng)
        print("whatif", json.dumps(out["whatif"]), flush=True)
    finally:
        conn.close()
        stop()
    return out


def whatif(conn, dataset, requests: int, rng: random.Random) -> dict:
    """`GET /whatif` on nsfw_score's max (0.8) dragged to a value anywhere in the scores'
    range (so the band read between the two limits is anything up to the whole column),
    against the plain way: the columns read whole and the moved limit applied in NumPy."""
    name = quote("threshold:nsfw_score:nsfw_score:max")
    column = dataset.to_table(columns=["nsfw_score"], filter="nsfw_score IS NOT NULL",
                              limit=20_000)["nsfw_score"].to_numpy()  # the scores' range
    low, high = float(column.min()), float(column.max())
    served, plain, with_funnel = [], [], []
    for _ in range(requests):
        value = rng.uniform(low, high)
        path = f"/whatif/{name}?value={value}&strip=24&columns=uri"
        served.append(get(conn, path))
        with_funnel.append(get(conn, path + "&funnel=true"))
        if len(plain) < max(5, requests // 10):
            started = time.perf_counter()
            t = dataset.to_table(columns=["sample_id", "selected", "nsfw_score"])
            scores = t["nsfw_score"].to_numpy(zero_copy_only=False).astype(np.float64)
            chosen = t["selected"].to_numpy(zero_copy_only=False)
            leaving = np.flatnonzero(chosen & (scores > value))
            order = np.argsort(np.abs(scores[leaving] - value))[:24]
            ids = [t["sample_id"][int(i)].as_py() for i in leaving[order]]
            if ids:
                quoted = ", ".join(f"'{i}'" for i in ids)
                dataset.to_table(columns=["sample_id", "uri"], filter=f"sample_id IN ({quoted})")
            plain.append(time.perf_counter() - started)
    record = {"served": percentiles(served), "with_funnel": percentiles(with_funnel),
              "plain_whole_columns": percentiles(plain)}
    record["ratio_p50"] = round(record["plain_whole_columns"]["p50_ms"]
                                / record["served"]["p50_ms"], 1)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="1000000", help="comma-separated table sizes")
    parser.add_argument("--requests", type=int, default=100, help="pages per queue")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="curate-queues-"))
    workdir.mkdir(parents=True, exist_ok=True)
    store = demo_table(workdir)
    results = []
    for rows in (int(r) for r in args.rows.split(",")):
        built = build(store, rows)
        print("built", json.dumps(built), flush=True)
        results.append({**built, **measure(store, args.requests)})
    print(json.dumps({"benchmark": "review_queues", "page": PAGE, "sizes": results}))


if __name__ == "__main__":
    main()
