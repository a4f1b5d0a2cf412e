"""Faults a user meets: two runs on one table, a table left with duplicate ids, a full
disk, errors of the machine rather than of curate. Real Lance, real processes."""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time

import lance
import lancedb
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import yaml

from curate import Pipeline, load_config
from curate.config import StoreConfig
from curate.errors import RunError
from curate.table.lease import RunLease
from curate.table.store import Store

from .conftest import ROOT


def store_at(path) -> Store:
    return Store(StoreConfig(uri=str(path), table="samples"))


# --- the run lease ------------------------------------------------------------------------


def test_a_second_holder_is_refused_until_the_first_releases(tmp_path):
    first = RunLease(store_at(tmp_path), "run-a").acquire()
    with pytest.raises(RunError) as refused:
        RunLease(store_at(tmp_path), "run-b").acquire()
    text = str(refused.value)
    assert "run run-a started at" in text and f"(pid {os.getpid()})" in text
    assert "is still running on table samples" in text and "--force-after" in text
    first.release()
    second = RunLease(store_at(tmp_path), "run-b").acquire()
    assert second.took_over is None  # a released lease is free, not taken over
    second.release()


LEASE_SCRIPT = """
import json, sys, time
from curate.config import StoreConfig
from curate.errors import RunError
from curate.table.lease import RunLease
from curate.table.store import Store
start = float(sys.argv[3])
options = json.loads(sys.argv[5])
store = Store(StoreConfig(uri=sys.argv[1], table="samples", storage_options=options))
while time.time() < start:
    pass
try:
    RunLease(store, sys.argv[2]).acquire()
except RunError:
    print("refused", flush=True)
    sys.exit(0)
print("holds", flush=True)
time.sleep(float(sys.argv[4]))
"""


def lease_process(store, name: str, start: float, hold_s: float,
                  options: str = "{}") -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LEASE_SCRIPT, str(store), name,
                             str(start), str(hold_s), options], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)


def race(store, options: str = "{}") -> list[str]:
    """What each of 3 processes that take the lease of `store` at the same instant got."""
    start = time.time() + 3  # after every interpreter has started
    procs = [lease_process(store, f"run-{k}", start, 2, options) for k in range(3)]
    return sorted(p.communicate(timeout=60)[0].strip() for p in procs)


def test_of_runs_racing_for_the_lease_exactly_one_wins(tmp_path):
    for attempt in range(2):
        outcomes = race(tmp_path / f"store{attempt}")
        assert outcomes == ["holds", "refused", "refused"], outcomes


class RacedLease(RunLease):
    """A lease whose create meets another run's create of the same slot, which Lance
    commits first: this run's create then lands as version 2, an overwrite."""

    def _write(self, slot, holder, mode):
        if mode == "create":
            other = dataclasses.replace(holder, run_id="run-first")
            super()._write(slot, other, "create")
            mode = "overwrite"
        super()._write(slot, holder, mode)


def test_a_create_that_lands_as_the_overwrite_of_a_racing_create_does_not_hold(tmp_path):
    with pytest.raises(RunError, match="run run-first started at"):
        RacedLease(store_at(tmp_path), "run-second").acquire()
    # the slot is run-first's, though its newest version holds run-second's row
    assert RunLease(store_at(tmp_path), "run-third")._read(0).run_id == "run-first"
    assert lance.dataset(f"{tmp_path}/_leases/samples/00000000.lance").to_table()[
        "run_id"].to_pylist() == ["run-second"]


def test_the_lease_of_a_killed_run_is_taken_over_and_a_silent_one_by_force(tmp_path):
    killed = lease_process(tmp_path, "run-killed", time.time(), 600)
    assert killed.stdout.readline().strip() == "holds"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    lease = RunLease(store_at(tmp_path), "run-next").acquire()  # the pid is gone: at once
    assert lease.took_over is not None and lease.took_over.run_id == "run-killed"
    # a holder that lives (this process) but is silent is taken over only by force
    with pytest.raises(RunError, match="still running"):
        RunLease(store_at(tmp_path), "run-third").acquire()
    time.sleep(1.5)
    forced = RunLease(store_at(tmp_path), "run-third", force_after_s=1).acquire()
    assert forced.took_over.run_id == "run-next"
    lease._beat_once()
    with pytest.raises(RunError, match="lost the lease"):
        lease.check()
    forced.release()
    lease.release()


# --- two `curate run` on one table --------------------------------------------------------


def photo_config(media, store) -> dict:
    return {"name": "faults", "store": {"uri": str(store)},
            "run": {"commit_every": 8, "num_cpus": 2},
            "stages": [{"type": "ingest_images", "paths": [str(media)],
                        "resources": {"batch_size": 4}},
                       {"type": "image_quality", "min_side": 64},
                       {"type": "exact_dedup"}, {"type": "phash_dedup"}]}


def sample_ids(store) -> pa.Array:
    return lancedb.connect(str(store)).open_table("samples").to_arrow()["sample_id"]


def test_a_second_run_on_a_busy_table_is_refused_and_the_table_stays_whole(
        ray_session, photo_dir, tmp_path, spawn):
    store = tmp_path / "store"
    config = tmp_path / "config.yaml"
    body = photo_config(photo_dir, store)
    body["run"]["executor"] = "ray"  # a local Ray of its own, and its chatter
    config.write_text(yaml.safe_dump(body))
    command = [sys.executable, "-m", "curate", "run", str(config), "--no-progress"]
    first = spawn(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                  text=True)  # the finalizer stops it and its Ray, whatever the outcome
    deadline = time.monotonic() + 120
    while not os.path.isdir(store / "_leases" / "samples"):
        assert first.poll() is None, first.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    # quiet: Ray's and Lance's chatter went to the log under the store, not the terminal
    for noise in ("core_worker", "WARNING", "Token authentication", "Progress bars"):
        assert noise not in err and noise not in second.stderr, (noise, err)
    assert list((store / "_logs").glob("samples-*.log"))
    assert second.returncode == 1, second.stderr
    assert "is still running on table samples" in second.stderr
    assert "Traceback" not in second.stderr
    ids = sample_ids(store)
    assert len(ids) == len(pc.unique(ids)) == 24
    again = Pipeline.from_config(load_config(photo_config(photo_dir, store))).run(
        progress=False)
    assert again.status == "up_to_date"


def test_a_table_with_duplicate_ids_is_repaired(ray_session, photo_dir, tmp_path):
    store = tmp_path / "store"
    config = photo_config(photo_dir, store)
    reference = Pipeline.from_config(load_config(config)).run(progress=False)
    # what two runs sharing the table used to leave: every row twice, verdicts cleared
    dataset = lance.dataset(str(store / "samples.lance"))
    rows = dataset.to_table()
    lance.write_dataset(rows.slice(0, 10), dataset.uri, mode="append")
    assert len(sample_ids(store)) == 34
    repaired = subprocess.run([sys.executable, "-m", "curate", "repair", "--store",
                               str(store)], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
    assert repaired.returncode == 0, repaired.stderr
    assert "removed 10 duplicate rows" in repaired.stdout
    assert len(sample_ids(store)) == 24
    # the next run after a failed one repairs by itself
    lance.write_dataset(rows.slice(5, 7), dataset.uri, mode="append")
    runs = lancedb.connect(str(store)).open_table("samples_runs")
    runs.update(values={"status": "failed"})
    rerun = Pipeline.from_config(load_config(config)).run(progress=False)
    assert rerun.status == "finished" and rerun.selected == reference.selected
    ids = sample_ids(store)
    assert len(ids) == len(pc.unique(ids)) == 24


# --- a full disk ----------------------------------------------------------------------------


@pytest.fixture()
def small_disk(tmp_path):
    """A 200 kB tmpfs: the store fills it midway through a run of 24 photos."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(disk)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def verdicts(store) -> list[tuple]:
    table = lancedb.connect(str(store)).open_table("samples").to_arrow()
    return sorted(zip(*(table[c].to_pylist() for c in ("sample_id", "selected",
                                                       "reject_reason", "phash"))))


def test_a_full_disk_fails_in_one_line_and_a_rerun_after_freeing_space_completes(
        ray_session, photo_dir, small_disk, tmp_path):
    reference = tmp_path / "reference"
    Pipeline.from_config(load_config(photo_config(photo_dir, reference))).run(progress=False)
    store = small_disk / "store"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(photo_config(photo_dir, store)))
    full = subprocess.run([sys.executable, "-m", "curate", "run", str(config),
                           "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 1, full.stderr
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in full.stderr, full.stderr
    assert f"the disk holding the table samples at {store} is full" in errors[0]
    assert "Free space there and run the same command again" in errors[0]
    assert ".rs:" not in errors[0]  # no Rust source paths
    dataset = lance.dataset(str(store / "samples.lance"))  # readable at its last commit
    assert 0 <= dataset.count_rows() <= 24
    subprocess.run(["mount", "-o", "remount,size=50m", str(small_disk)], check=True)
    rerun = Pipeline.from_config(load_config(photo_config(photo_dir, store))).run(
        progress=False)
    assert rerun.status == "finished"
    assert verdicts(store) == verdicts(reference)


# --- dead workers ---------------------------------------------------------------------------


def pool_workers() -> list[int]:
    """The pids of the actor-pool workers alive now (decoding and model pools alike)."""
    out = subprocess.run(["ps", "-eo", "pid=,args="], capture_output=True, text=True).stdout
    return [int(line.split(None, 1)[0]) for line in out.splitlines()
            if "ray::MapWorker(MapBatches(" in line and "Worker))" in line]


def worker_config(media, store) -> dict:
    from .conftest import tiny_models

    return {"name": "workers", "store": {"uri": str(store)},
            "run": {"commit_every": 8, "num_cpus": 2},
            "stages": [{"type": "ingest_images", "paths": [str(media)],
                        "resources": {"batch_size": 4}},
                       {"type": "image_quality", "min_side": 64},
                       {"type": "phash_dedup"},
                       {"type": "clip_embed", "model": str(tiny_models() / "tiny-clip"),
                        "resources": {"batch_size": 4}},
                       {"type": "exact_dedup"}]}


def test_killed_pool_workers_are_replaced_and_the_run_ends_as_an_undisturbed_one(
        ray_session, tmp_path):
    import threading

    from curate.media.samples import write_photos

    media = tmp_path / "media"
    write_photos(media, 96, size=(640, 480), seed=5)
    reference = tmp_path / "reference"
    Pipeline.from_config(load_config(worker_config(media, reference))).run(progress=False)
    store = tmp_path / "store"
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["summary"] = Pipeline.from_config(
                load_config(worker_config(media, store))).run(progress=False)
        except BaseException as exc:  # reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 240
    killed: list[int] = []
    while not killed:
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "no pool worker to kill"
        if os.path.isdir(store / "samples.lance") and len(sample_ids(store)) > 0:
            killed = pool_workers()  # the decoding pool's and the model pool's
        time.sleep(0.05)
    assert len(sample_ids(store)) < 96, "the run ended before its workers were killed"
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["summary"].status == "finished"
    got = lancedb.connect(str(store)).open_table("samples").to_arrow().sort_by("sample_id")
    want = lancedb.connect(str(reference)).open_table("samples").to_arrow().sort_by("sample_id")
    assert got.drop_columns(["clip_embedding"]).equals(want.drop_columns(["clip_embedding"]))
    assert got["clip_embedding"].to_pylist() == want["clip_embedding"].to_pylist()


@pytest.fixture()
def exit_stage():
    """A stage whose worker process exits on any input whose uri holds `marker`: a file
    that crashes a decoder, as far as the run can tell."""
    import ray.cloudpickle
    from pydantic import Field

    from curate import registry
    from curate.stage import RowStage, StageParams

    class ExitParams(StageParams):
        marker: str = Field(description="uris holding this end the worker")

    class ExitOn(RowStage):
        Params = ExitParams

        def reads(self):
            return ("uri", "error")

        def writes(self):
            return {"exit_on_seen": pa.bool_()}

        def process(self, batch, images):  # like a decoder: rows already in error are skipped
            rows = zip(batch["uri"].to_pylist(), batch["error"].to_pylist())
            if any(self.params.marker in uri and error is None for uri, error in rows):
                os._exit(1)
            return {"exit_on_seen": pa.array([True] * batch.num_rows)}

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    registry.register("exit_on")(ExitOn)
    yield
    registry._STAGES.pop("exit_on")
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


def test_a_batch_that_kills_every_worker_is_named_set_aside_and_the_rerun_finishes(
        ray_session, photo_dir, exit_stage, tmp_path):
    from curate.errors import RunError

    media = tmp_path / "media"
    shutil.copytree(photo_dir, media)
    poison = sorted(media.iterdir())[5]
    poison = poison.rename(poison.with_name("poison-" + poison.name))
    config = {"name": "poison", "store": {"uri": str(tmp_path / "store")},
              "run": {"commit_every": 4, "num_cpus": 2},
              "stages": [{"type": "ingest_images", "paths": [str(media)],
                          "resources": {"batch_size": 1}},
                         {"type": "exit_on", "marker": "poison-"},
                         {"type": "image_quality", "min_side": 64}]}
    with pytest.raises(RunError) as failed:
        Pipeline.from_config(load_config(config)).run(progress=False)
    message = str(failed.value)
    assert "workers of ingest_images + exit_on + image_quality died on every try (4)" \
        in message and str(poison) in message and "set aside" in message
    runs = lancedb.connect(str(tmp_path / "store")).open_table("samples_runs").to_arrow()
    assert runs["status"].to_pylist()[-1] == "failed"
    rerun = Pipeline.from_config(load_config(config)).run(progress=False)
    assert rerun.status == "finished" and rerun.rows_total == 24
    table = lancedb.connect(str(tmp_path / "store")).open_table("samples").to_arrow()
    errors = {uri: error for uri, error in zip(table["uri"].to_pylist(),
                                               table["error"].to_pylist()) if error}
    assert list(errors) == [str(poison)]
    assert errors[str(poison)].startswith("worker_died: the worker of ingest_images + "
                                          "exit_on + image_quality died on every try")
