"""Listing and reading small objects from an S3 server: obstore (what curate reads media
with, `curate/media/objstore.py`) against pyarrow.fs (the other candidate, already a
dependency) and boto3's plain loop (the raw client call, one request after another):

    python benchmarks/object_store.py                    # 100,000 objects of 16 KB
    python benchmarks/object_store.py --objects 5000     # quick

The server is moto's, on loopback, checking signatures (as the tests run it): one Python
process, so it bounds every client's rate; the figures compare clients against the same
server, not against a real object store. Listing: every key under a prefix, with
obstore's pages (1,000 keys) and pyarrow's recursive FileSelector (one list). Reading:
every object whole, on 16 threads for obstore and pyarrow.fs, one after another for
boto3. Batches: the first 2,000 objects read as a decoding worker reads them, 32 to a
batch, with curate's read-ahead (8 at once) against one after another, through a proxy
that adds 20 ms to each request (a real store's first-byte latency; moto on loopback
answers at once). Flat levels: N and 8N objects right under one prefix (`--flat N`), split
into listing units by curate's driver (key bounds of runs of 10,000 objects, no keys held)
against the level gathered whole (obstore's `list_with_delimiter`, what a driver splitting
by prefix must otherwise hold): seconds and the driver's peak Python memory (tracemalloc).
The last line printed is a JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

BUCKET = "bench-objects"


def boto(options: dict):
    import boto3

    return boto3.client("s3", endpoint_url=options["aws_endpoint"], region_name="us-east-1",
                        aws_access_key_id=options["aws_access_key_id"],
                        aws_secret_access_key=options["aws_secret_access_key"])


def arrow_fs(options: dict):
    import pyarrow.fs as pafs

    return pafs.S3FileSystem(access_key=options["aws_access_key_id"],
                             secret_key=options["aws_secret_access_key"],
                             endpoint_override=options["aws_endpoint"], scheme="http",
                             region="us-east-1")


def timed(work) -> tuple[float, object]:
    started = time.perf_counter()
    out = work()
    return time.perf_counter() - started, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=16_384, help="bytes per object")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--batch-objects", type=int, default=2000,
                        help="objects read in worker-sized batches (the first N)")
    parser.add_argument("--latency-ms", type=float, default=20.0,
                        help="added to each request of the batch reads (a real store's "
                             "first-byte latency)")
    parser.add_argument("--flat", type=int, default=5000,
                        help="N: flat levels of N and 8N objects (0: none)")
    args = parser.parse_args()

    from curate.media import objstore
    from tests.conftest import FlakyEndpoint, start_moto_s3

    server, options = start_moto_s3(BUCKET)
    client = boto(options)
    keys = [f"small/{k % 100:02d}/{k:07d}.jpg" for k in range(args.objects)]
    body = os.urandom(args.size)
    with ThreadPoolExecutor(args.threads) as pool:
        list(pool.map(lambda key: client.put_object(
            Bucket=BUCKET, Key=key, Body=body), keys))
    uris = [f"s3://{BUCKET}/{k}" for k in keys]
    n = args.objects

    def list_boto():
        found = 0
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET,
                                                                      Prefix="small/"):
            found += len(page.get("Contents", []))
        return found

    def list_obstore():
        return sum(len(page) for page in objstore.list_pages(f"s3://{BUCKET}/small", options))

    def list_arrow():
        import pyarrow.fs as pafs

        infos = arrow_fs(options).get_file_info(pafs.FileSelector(f"{BUCKET}/small",
                                                                  recursive=True))
        return sum(1 for i in infos if i.type == pafs.FileType.File)

    def read_boto():
        return sum(len(client.get_object(Bucket=BUCKET, Key=k)["Body"].read()) for k in keys)

    def read_obstore():
        with ThreadPoolExecutor(args.threads) as pool:
            return sum(pool.map(lambda u: len(objstore.read(u, options, 1 << 30)), uris))

    def read_arrow():
        fs = arrow_fs(options)

        def one(key):
            with fs.open_input_stream(f"{BUCKET}/{key}") as f:
                return len(f.read())

        with ThreadPoolExecutor(args.threads) as pool:
            return sum(pool.map(one, keys))

    sample = uris[:min(n, args.batch_objects)]
    # a real store answers a GET after tens of ms; moto on loopback at once
    distant = FlakyEndpoint(options, lambda *request: False, delay_s=args.latency_ms / 1000)

    def batches(ahead: int):
        """A decoding worker's reads: batches of 32 objects, each batch read with
        `read_ahead` (curate's ingest_images, 8 at once), or one object after another
        (ahead=1: what a worker did before), through a proxy adding `--latency-ms`."""
        def work():
            return sum(len(future.result()) for lo in range(0, len(sample), 32)
                       for future in objstore.read_ahead(sample[lo:lo + 32], distant.options,
                                                         1 << 30, ahead=ahead))
        return work

    results = {}
    for name, work, count in [
        ("list boto3 loop", list_boto, n), ("list obstore", list_obstore, n),
        ("list pyarrow.fs", list_arrow, n), ("read boto3 loop", read_boto, n),
        ("read obstore", read_obstore, n), ("read pyarrow.fs", read_arrow, n),
        ("batch one after another", batches(1), len(sample)),
        ("batch read ahead", batches(8), len(sample)),
    ]:
        seconds, got = timed(work)
        expect = count if name.startswith("list") else count * args.size
        assert got == expect, f"{name}: {got} != {expect}"
        results[name] = round(count / seconds, 1)
        print(f"{name}: {results[name]:,.0f} objects/s", flush=True)
    distant.__exit__(None, None, None)
    flat = flat_levels(args, client, options) if args.flat else {}
    server.stop()
    out = {
        "benchmark": "object_store", "objects": n, "bytes_each": args.size,
        "threads": args.threads, "cpus": os.cpu_count(), "objects_per_s": results,
        "list_obstore_vs_boto3_loop": round(results["list obstore"]
                                            / results["list boto3 loop"], 3),
        "list_obstore_vs_pyarrow": round(results["list obstore"]
                                         / results["list pyarrow.fs"], 3),
        "read_obstore_vs_boto3_loop": round(results["read obstore"]
                                            / results["read boto3 loop"], 3),
        "read_obstore_vs_pyarrow": round(results["read obstore"]
                                         / results["read pyarrow.fs"], 3),
        "batch_objects": len(sample), "batch_latency_ms": args.latency_ms,
        "batch_read_ahead_vs_one_after_another": round(
            results["batch read ahead"] / results["batch one after another"], 3),
        "flat_levels": flat,
    }
    print(json.dumps(out))


def flat_levels(args, client, options: dict) -> dict:
    """The driver's split of a flat level of N and of 8N objects (curate's, by key bounds)
    against the level gathered whole: seconds, peak traced memory, units."""
    import tracemalloc

    import obstore

    from curate.media import objstore
    from curate.stages.image.ingest_images import IngestImages

    out = {}
    for count in (args.flat, 8 * args.flat):
        prefix = f"flat{count}"
        with ThreadPoolExecutor(args.threads) as pool:
            list(pool.map(lambda k, prefix=prefix: client.put_object(
                Bucket=BUCKET, Key=f"{prefix}/{k:08d}.jpg", Body=b"x"), range(count)))
        stage = IngestImages(paths=[f"s3://{BUCKET}/{prefix}/"], storage_options=options)

        def whole(prefix=prefix):
            store, _ = objstore.store_of(f"s3://{BUCKET}/{prefix}", options)
            return obstore.list_with_delimiter(store, prefix)

        row = {}
        for name, work in [("split by key bounds", stage.list_entries),
                           ("whole level", whole)]:
            tracemalloc.start()
            seconds, got = timed(work)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            row[name] = {"seconds": round(seconds, 3), "peak_mib": round(peak / 2**20, 2)}
            if name.startswith("split"):
                row[name]["units"] = len(got)
            else:
                assert len(got["objects"]) == count
            print(f"flat level of {count:,}: {name}: {seconds:.2f} s, peak "
                  f"{peak / 2**20:.2f} MiB", flush=True)
        out[count] = row
    return out


if __name__ == "__main__":
    main()
