"""The feature cache of `curate serve` writes the samples table only under the run lease:
a feature computed while a run holds the lease is answered and kept beside the table, and
reaches the row once the run has ended."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import lance
import lancedb
import pytest

from curate.config import StoreConfig
from curate.table.lease import CACHE_RUN, RunLease
from curate.table.store import Store

from .conftest import ROOT, copy_store, serve_settings

#: A run's hold of the lease, taken as `curate run` takes it, in a process of its own.
HOLD = """
import sys
from curate.config import StoreConfig
from curate.table.lease import RunLease
from curate.table.store import Store
lease = RunLease(Store(StoreConfig(uri=sys.argv[1], table="samples")), "run-holding")
lease.acquire()
print("holds", flush=True)
sys.stdin.readline()
lease._beat_once()  # what the run's heartbeat does: notices a lease taken from it
lease.check()  # what the run does before each commit: raises if it lost the lease
print("still holds" if lease.held() else "lost", flush=True)
lease.release()
"""


def store_at(path) -> Store:
    return Store(StoreConfig(uri=str(path), table="samples"))


def test_a_feature_computed_during_a_run_is_served_and_written_after_it(demo_store,
                                                                        tmp_path):
    from curate.serve.config import load_serve_config
    from curate.serve.deployments import FeatureService

    store = copy_store(demo_store, tmp_path / "store")
    samples = lancedb.connect(str(store)).open_table("samples")
    row = next(r for r in samples.to_arrow().to_pylist()
               if r["uri"].endswith("astronaut.jpg"))
    where = f"sample_id = '{row['sample_id']}'"
    samples.update(where=where, values={"blur": None})  # a value the table lacks

    def table_blur():
        return lance.dataset(store / "samples.lance").to_table(
            columns=["blur"], filter=where)["blur"].to_pylist()

    def version() -> int:
        return lance.dataset(store / "samples.lance").version

    service = FeatureService(load_serve_config(serve_settings(store)),
                             store_at(store).runs()[-1]["config_yaml"], segments=[])
    request = {"sample_id": row["sample_id"], "features": ["blur"]}
    run = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], cwd=ROOT, text=True,
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    async def scenario():
        try:
            assert run.stdout.readline().strip() == "holds"
            before = version()
            got = await service.compute(request)
            # answered at once with the value the run computed for this image
            assert got["status"] == 200 and got["computed"] == ["blur"], got
            assert got["features"]["blur"] == pytest.approx(row["blur"], rel=1e-5)
            assert got["stored"] == "pending" and "a run holds the lease" in got["note"]
            # the samples table was not written: same version, the row still without it
            assert version() == before and table_blur() == [None]
            # kept beside the table and served from there
            again = await service.compute(request)
            assert again["cached"] == ["blur"] and again["computed"] == []
            assert again["features"] == got["features"]
            assert not await service.flush()  # the run still holds the lease
            assert version() == before
            run.stdin.write("\n")
            run.stdin.flush()
            assert run.stdout.readline().strip() == "still holds"  # the run never lost it
        finally:
            run.stdin.close()
            run.wait(timeout=60)
        assert run.returncode == 0
        # the run has ended: the kept value goes into the row, and leaves the side table
        assert await service.flush()
        assert version() > before and table_blur() == [got["features"]["blur"]]
        side = lancedb.connect(str(store)).open_table("samples_features").to_arrow()
        assert row["sample_id"] not in side["sample_id"].to_pylist()
        last = await service.compute(request)
        assert last["cached"] == ["blur"] and last["computed"] == []

    asyncio.run(scenario())


def test_a_run_starting_during_a_cache_write_waits_for_it_and_is_not_refused(tmp_path):
    store = store_at(tmp_path)
    cache = RunLease(store, CACHE_RUN + "a")
    assert cache.try_acquire()
    run = RunLease(store, "run-a")
    saw_cache, got = threading.Event(), {}
    read = run._read

    def reading(slot):
        holder = read(slot)
        if holder is not None and holder.is_cache:
            saw_cache.set()
        return holder

    def start():
        try:
            got["lease"] = run.acquire()
        except Exception as exc:  # the test reports it
            got["error"] = exc

    run._read = reading
    thread = threading.Thread(target=start)
    thread.start()
    assert saw_cache.wait(60)  # the run found the cache's hold ...
    cache.release()
    thread.join(120)
    assert "error" not in got, got  # ... and took the lease when it ended
    assert got["lease"].slot == 1 and got["lease"].took_over is None
    # a run's lease, even a silent one, is never taken by the cache
    assert not RunLease(store, CACHE_RUN + "b").try_acquire()
    run.release()
    after = RunLease(store, CACHE_RUN + "c")
    assert after.try_acquire()
    after.release()


def test_kept_values_reach_the_table_in_steps_under_one_hold(demo_store, tmp_path,
                                                              monkeypatch):
    """Values kept aside while runs held the lease are merged a bounded step at a time:
    every one reaches its row, and the side table is left without them."""
    import pyarrow as pa

    from curate.table import features
    from curate.table.features import FeatureCache

    store = copy_store(demo_store, tmp_path / "store")
    samples = lancedb.connect(str(store)).open_table("samples")
    ids = sorted(samples.to_arrow()["sample_id"].to_pylist())[:5]
    quoted = ", ".join(f"'{i}'" for i in ids)
    samples.update(where=f"sample_id IN ({quoted})", values={"blur": None})
    cache = FeatureCache(store_at(store), {"blur": pa.float32()})
    kept = {i: float(n) + 0.5 for n, i in enumerate(ids)}
    blur = pa.array([kept[i] for i in ids], pa.float32())
    cache._side_put(pa.table({"sample_id": ids, "blur": blur, "uri": ["u"] * 5,
                              features.FOR_TABLE: [True] * 5}))
    monkeypatch.setattr(features, "MERGE_BATCH", 2)
    assert cache.pending().num_rows == 2  # one step's worth at a time
    assert cache.flush()
    got = lance.dataset(store / "samples.lance").to_table(
        columns=["sample_id", "blur"], filter=f"sample_id IN ({quoted})").to_pylist()
    assert {r["sample_id"]: r["blur"] for r in got} == kept
    assert cache.pending() is None
