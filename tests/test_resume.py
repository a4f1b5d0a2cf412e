"""An interrupted run, resumed with `curate run` again, ends with the same table as an
uninterrupted one. The interruptions are real: SIGKILL and SIGINT to a running CLI."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import lancedb
import pytest
import yaml

from curate import Pipeline, load_config

from .conftest import ROOT, kill_family, still_running, tiny_models


@pytest.fixture(scope="module")
def many_photos(tmp_path_factory):
    from curate.media.samples import write_photos

    directory = tmp_path_factory.mktemp("many")
    write_photos(directory, 120, size=(1024, 768), seed=7)
    return directory


def config_for(media, store, executor: str = "auto") -> dict:
    return {
        "name": "resume",
        "store": {"uri": str(store)},
        "run": {"commit_every": 8, "num_cpus": 2, "executor": executor},
        "stages": [
            {"type": "ingest_images", "paths": [str(media)], "decode_max_side": None,
             "resources": {"batch_size": 4}},
            {"type": "image_quality", "min_side": 128, "min_blur": 50},
            {"type": "exact_dedup"},
            {"type": "phash_dedup", "max_distance": 10},
            # model pools too: killed midway like the rest, and resumed bit for bit
            {"type": "clip_embed", "model": str(tiny_models() / "tiny-clip"),
             "resources": {"batch_size": 8}},
            {"type": "nsfw_score", "resources": {"batch_size": 8}},
            {"type": "semantic_dedup", "eps": 0.02},
            {"type": "diversity_sample", "target": 75},
        ],
    }


def rows_in(store) -> int:
    try:
        return lancedb.connect(str(store)).open_table("samples").count_rows()
    except (ValueError, OSError):
        return 0


def interrupt_midway(tmp_path, media, store, sig, executor,
                     spawn) -> subprocess.CompletedProcess:
    return interrupted(tmp_path, config_for(media, store, executor), store, sig, spawn)


def interrupted(tmp_path, config: dict, store, sig, spawn) -> subprocess.CompletedProcess:
    """`curate run` of `config` in a subprocess, sent `sig` right after its first commit
    (a SIGKILL takes whatever it started down with it)."""
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = spawn(  # its own process group, as a terminal job would have
        [sys.executable, "-m", "curate", "run", str(path), "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.monotonic() + 240
    while rows_in(store) == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run committed nothing in time"
        time.sleep(0.05)
    family = spawn.family(proc)
    os.killpg(proc.pid, sig)
    out, err = proc.communicate(timeout=60)
    if sig == signal.SIGKILL:
        kill_family(proc, family)  # what a kill -9 leaves running (Ray's workers) goes too
    else:  # stopped: nothing it started is left
        assert not still_running(family), err
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def table_of(store):
    return lancedb.connect(str(store)).open_table("samples").to_arrow().sort_by("sample_id")


@pytest.fixture(scope="module")
def reference(ray_session, many_photos, tmp_path_factory):
    store = tmp_path_factory.mktemp("reference") / "store"
    Pipeline.from_config(load_config(config_for(many_photos, store))).run(progress=False)
    return table_of(store)


@pytest.mark.parametrize("executor", ["local", "ray"])
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["kill-9", "ctrl-c"])
def test_interrupted_run_resumes_to_the_same_table(sig, executor, ray_session, many_photos,
                                                   reference, tmp_path, spawn):
    """Cut off in this process's threads (local) or in a local Ray's pools (ray); resumed
    on the session's Ray: the table of one uninterrupted run either way."""
    store = tmp_path / "store"
    result = interrupt_midway(tmp_path, many_photos, store, sig, executor, spawn)
    kept = rows_in(store)
    assert 0 < kept < reference.num_rows, "the run was not interrupted midway"
    if sig == signal.SIGINT:
        assert result.returncode == 130, result.stderr
        assert "run the same command again" in result.stderr
        runs = lancedb.connect(str(store)).open_table("samples_runs").to_arrow().to_pylist()
        assert runs[-1]["status"] == "interrupted"
    else:
        assert result.returncode == -signal.SIGKILL
    resumed = Pipeline.from_config(load_config(config_for(many_photos, store))).run(
        progress=False)
    assert resumed.status == "finished"
    assert resumed.rows_processed == reference.num_rows - kept  # finished rows not redone
    assert table_of(store).equals(reference)


def test_a_run_in_this_process_makes_the_table_a_run_on_ray_makes(ray_session, many_photos,
                                                                   reference, tmp_path):
    """executor local: the same stages in threads here, tasks inline, no Ray; the table
    is the Ray run's, bit for bit (embeddings and verdicts included)."""
    store = tmp_path / "store"
    summary = Pipeline.from_config(load_config(config_for(many_photos, store, "local"))).run(
        progress=False)
    assert summary.status == "finished" and summary.rows_processed == reference.num_rows
    assert table_of(store).equals(reference)
