"""Runs without Ray (`run.executor: local`, and `auto` on a small run with no cluster): the
choice, the move to Ray when the inputs are many, and the same table either way.
(test_resume.py interrupts local runs and compares them with Ray's bit for bit.)"""

from __future__ import annotations

import json
import subprocess
import sys

import lance
import pytest
import yaml

from curate.config import load_config
from curate.engine import backend
from curate.plan import build_stages

from .conftest import ROOT


def stages_of(*extra: dict):
    return build_stages(load_config({
        "name": "t", "stages": [{"type": "ingest_images", "paths": ["x"]}, *extra]}))


def gpus(stages) -> bool:
    return any(s.resources.gpus for s in stages)


def test_auto_runs_here_unless_a_cluster_a_gpu_or_a_joined_ray_says_otherwise(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setitem(sys.modules, "ray", None)  # as in a process that never imported it
    cpu = stages_of({"type": "image_quality"})
    assert backend.wants_ray("auto", None, gpus(cpu)) is False
    assert backend.wants_ray("auto", "ray://head:10001", gpus(cpu)) is True
    gpu = stages_of({"type": "image_quality", "resources": {"gpus": 1}})
    assert backend.wants_ray("auto", None, gpus(gpu)) is True
    assert backend.wants_ray("local", None, gpus(gpu)) is False  # told: no Ray, even so
    assert backend.wants_ray("ray", None, gpus(cpu)) is True
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")  # inside a Ray job
    assert backend.wants_ray("auto", None, gpus(cpu)) is True


def test_auto_with_ray_joined_in_this_process_stays_on_it(ray_session, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert backend.wants_ray("auto", None) is True


def test_inline_tasks_give_values_where_ray_gives_references():
    from curate.engine import tasks
    table = __import__("pyarrow").table({"k": [3, 1, 3, 2], "v": [1, 2, 3, 4]})
    inline = backend.InlineBackend()
    parts = tasks.map_parts(inline, [table, table], lambda t: t.slice(1))
    assert [p.num_rows for p in inline.gather(parts)] == [3, 3]
    met = tasks.shuffle(inline, [table], "k", lambda t: (t, t.slice(0, 1)), returns=2)
    assert len(met) == 1 and met[0][0].num_rows == 4 and met[0][1].num_rows == 1


def cli_run(tmp_path, media, store, name: str, **run) -> dict:
    config = {"name": "local", "store": {"uri": str(store)}, "run": run, "stages": [
        {"type": "ingest_images", "paths": [str(media)], "resources": {"batch_size": 4}},
        {"type": "image_quality", "min_side": 128},
        {"type": "exact_dedup"},
        {"type": "phash_dedup", "max_distance": 6},
    ]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / f"{name}.json"
    env = {k: v for k, v in __import__("os").environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "curate", "run", str(path), "--no-progress",
                           "--json", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text()) | {"stdout": done.stdout}


def table_of(store):
    return lance.dataset(str(store / "samples.lance")).to_table().sort_by("sample_id")


@pytest.mark.timeout(300)
def test_a_small_run_stays_here_and_a_large_one_moves_to_ray_with_the_same_table(
        tmp_path, photo_dir):
    here = cli_run(tmp_path, photo_dir, tmp_path / "here", "here")
    assert here["executor"] == "local" and "in this process" in here["stdout"]
    assert here["rows_processed"] == 24
    moved = cli_run(tmp_path, photo_dir, tmp_path / "moved", "moved", local_max_inputs=10)
    assert moved["executor"] == "ray" and "on Ray" in moved["stdout"]
    assert moved["rows_processed"] == 24
    assert [s["kept"] for s in moved["stages"]] == [s["kept"] for s in here["stages"]]
    assert table_of(tmp_path / "moved").equals(table_of(tmp_path / "here"))
