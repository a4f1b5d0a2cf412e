"""`curate run CONFIG --address HEAD:PORT` on a real two-node Ray cluster on this machine:
a head with no CPUs (nothing runs beside the driver) and a worker node started in another
working directory, declaring 16 GPUs, both with Ray 2.60's token authentication, each
stopped by its own process group. The config names its models and media by relative
paths, as the demo does; the table must equal a local run's. GPU stages with no
concurrency share the declared GPUs; a stage no node can hold is refused."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lancedb
import pyarrow as pa
import pytest
import yaml

from .conftest import ROOT, free_port, gpu_cluster_config, tiny_models

RAY = Path(sys.executable).parent / "ray"
#: GPUs the worker node declares (it has no CUDA: Ray schedules them as resources).
GPUS = 16


def _stop(processes: list[subprocess.Popen]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # `ray start --block` stops its own processes
    for process in processes:
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # whatever is left in its group
        except ProcessLookupError:
            pass


def _wait_for(marker: Path, process: subprocess.Popen, what: str) -> None:
    """`ray start` writes `ray_current_cluster` in its temp dir once its node is up (a
    worker node: registered with the head)."""
    deadline = time.monotonic() + 120
    while not marker.is_file():
        assert process.poll() is None, f"{what} exited"
        assert time.monotonic() < deadline, f"{what} did not come up"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_nodes():
    # Ray's socket paths must stay short: its temp dirs go near the root.
    tmp = Path(tempfile.mkdtemp(prefix="curate-mn-", dir="/tmp"))
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    elsewhere = tmp / "worker-cwd"  # the worker node's working directory is not ROOT
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
                "PATH": f"{RAY.parent}{os.pathsep}{os.environ.get('PATH', '')}"})
    port = free_port()
    address = f"127.0.0.1:{port}"
    common = ["--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
              f"--dashboard-agent-listen-port={free_port()}"]
    processes: list[subprocess.Popen] = []
    try:
        processes.append(subprocess.Popen(
            [str(RAY), "start", "--head", *common, "--num-cpus=0", f"--port={port}",
             "--include-dashboard=false", f"--dashboard-port={free_port()}",
             f"--ray-client-server-port={free_port()}",
             f"--temp-dir={tmp / 'head'}"],
            cwd=tmp, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
        _wait_for(tmp / "head" / "ray_current_cluster", processes[0], "ray start --head")
        processes.append(subprocess.Popen(
            [str(RAY), "start", f"--address={address}", *common, "--num-cpus=2",
             f"--num-gpus={GPUS}",  # declared: Ray schedules them; the models run on CPU
             f"--temp-dir={tmp / 'worker'}"],
            cwd=elsewhere, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True))
        _wait_for(tmp / "worker" / "ray_current_cluster", processes[1], "the worker node")
        yield {"address": address, "env": env}
    finally:
        _stop(processes)
        shutil.rmtree(tmp, ignore_errors=True)


def relative_demo_config(path: Path, store: Path) -> Path:
    """configs/demo.yaml as it is (relative media, model and weights paths), with the store
    in a temp dir."""
    tiny_models()  # `make demo` builds examples/models
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert raw["stages"][0]["paths"] == ["examples/media"]
    assert raw["stages"][4]["model"] == "examples/models/tiny-clip"
    raw["store"]["uri"] = str(store)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def read_table(store: Path) -> pa.Table:
    return lancedb.connect(str(store)).open_table("samples").to_arrow().sort_by("sample_id")


@pytest.mark.cluster
def test_a_run_on_two_nodes_equals_a_local_run(two_nodes, ray_session, tmp_path, monkeypatch):
    from curate.config import load_config
    from curate.pipeline import Pipeline

    config = relative_demo_config(tmp_path / "demo.yaml", tmp_path / "cluster-store")
    cluster_run = subprocess.Popen(
        [sys.executable, "-m", "curate", "run", str(config), "--address",
         two_nodes["address"], "--no-progress"],
        cwd=ROOT, env=two_nodes["env"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    try:
        # Meanwhile, the same config run locally from the same directory, into another store.
        monkeypatch.chdir(ROOT)
        local_config = load_config(config, [f"store.uri={tmp_path / 'local-store'}"])
        Pipeline.from_config(local_config).run(progress=False)
        output, _ = cluster_run.communicate(timeout=300)
    finally:
        if cluster_run.poll() is None:
            cluster_run.kill()
    assert cluster_run.returncode == 0, output[-5000:]

    remote, local = read_table(tmp_path / "cluster-store"), read_table(tmp_path / "local-store")
    assert remote.num_rows == local.num_rows == 33
    assert remote.column_names == local.column_names
    assert [c for c in local.column_names if not remote[c].equals(local[c])] == []
    assert remote["uri"][0].as_py().startswith(str(ROOT / "examples" / "media"))

    # What the run records is the config as written: relative paths, the file's hash.
    runs = lancedb.connect(str(tmp_path / "cluster-store")).open_table("samples_runs")
    (run,) = runs.to_arrow().to_pylist()
    assert run["status"] == "finished"
    assert run["config_hash"] == load_config(config).config_hash()
    assert "model: examples/models/tiny-clip" in run["config_yaml"]


def test_local_paths_are_resolved_for_the_run_not_in_the_config(tmp_path, monkeypatch):
    """Stages get absolute paths (workers elsewhere must find the same files); the config,
    its YAML and hash, and the row fingerprints keep what the file says."""
    from curate.config import load_config
    from curate.plan import build_stages, local_path, row_stages_hash

    tiny_models()
    monkeypatch.chdir(ROOT)
    config = load_config(ROOT / "configs" / "demo.yaml")
    before = (config.to_yaml(), config.config_hash())
    stages = build_stages(config)
    assert stages[0].params.paths == [str(ROOT / "examples" / "media")]
    assert stages[4].params.model == str(ROOT / "examples" / "models" / "tiny-clip")
    assert stages[5].params.weights == str(ROOT / "examples/models/tiny-aesthetic.safetensors")
    assert config.stages[4].model == "examples/models/tiny-clip"
    assert (config.to_yaml(), config.config_hash()) == before
    # from elsewhere, the same file names other (here: missing) paths; the hash of the rows
    # follows the weights, not where the run started
    monkeypatch.chdir(tmp_path)
    shutil.copytree(ROOT / "examples" / "models" / "tiny-clip", tmp_path / "examples" /
                    "models" / "tiny-clip")
    elsewhere = build_stages(config)
    assert elsewhere[4].params.model == str(tmp_path / "examples" / "models" / "tiny-clip")
    assert elsewhere[0].params.paths == ["examples/media"]  # missing here: reported as written
    assert elsewhere[4].row_fingerprint() == stages[4].row_fingerprint()
    assert row_stages_hash(elsewhere[0], elsewhere[1:5]) == row_stages_hash(stages[0],
                                                                             stages[1:5])
    # hub ids, URLs and absolute paths stay; globs and ~ are resolved
    assert local_path("openai/clip-vit-large-patch14") == "openai/clip-vit-large-patch14"
    assert local_path("https://host/w.pth") == "https://host/w.pth"
    assert local_path("/data/models/x") == "/data/models/x"
    assert local_path("media/**/*.jpg") == str(tmp_path / "media" / "**" / "*.jpg")
    assert local_path("~/x") == os.path.expanduser("~/x")


def run_on(cluster: dict, raw: dict, path: Path, timeout: float = 300
           ) -> subprocess.CompletedProcess:
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return subprocess.run(
        [sys.executable, "-m", "curate", "run", str(path), "--address", cluster["address"],
         "--no-progress"], cwd=ROOT, env=cluster["env"], capture_output=True, text=True,
        timeout=timeout)


@pytest.mark.cluster
def test_gpu_cluster_config_runs_with_pools_planned_within_the_gpus(two_nodes, tmp_path):
    """configs/gpu-cluster.yaml (no concurrency set) on 16 declared GPUs: every GPU pool
    gets workers, all of them start within the 16 GPUs, the run finishes with its captions,
    and the record and the summary show each pool."""
    run = run_on(two_nodes, gpu_cluster_config(tmp_path / "store"), tmp_path / "gpu.yaml")
    assert run.returncode == 0, (run.stdout + run.stderr)[-5000:]
    (record,) = lancedb.connect(str(tmp_path / "store")).open_table("samples_runs") \
        .to_arrow().to_pylist()
    pools = json.loads(record["pools_json"])
    gpu_pools = [p for p in pools if p["gpus"]]
    assert [p["stages"][0] for p in gpu_pools] == ["clip_embed", "caption"]
    assert gpu_pools[1]["stages"][:2] == ["caption", "vlm_score"]  # one engine, one pool
    assert all(p["workers"] >= 1 and p["rows"] > 0 for p in gpu_pools)
    # the workers that made rows, counted from the rows: each pool's within its bounds
    assert all(1 <= p["workers_used"] <= p["max_workers"] for p in pools)
    assert all(1 <= p["peak_workers"] <= p["workers_used"] for p in pools)
    assert all(p["worker_peak_mb"] > 50 for p in pools)  # each pool's workers' own memory
    assert sum(p["workers"] * p["gpus"] for p in gpu_pools) <= GPUS
    for grown in gpu_pools:
        others = sum(p["min_workers"] * p["gpus"] for p in gpu_pools if p is not grown)
        assert grown["max_workers"] * grown["gpus"] + others <= GPUS
    assert "actor pools" in run.stdout and "caption + vlm_score" in run.stdout
    table = lancedb.connect(str(tmp_path / "store")).open_table("samples").to_arrow()
    captioned = table.filter(pa.compute.is_valid(table["caption"]))
    assert captioned.num_rows == gpu_pools[1]["rows"] > 0


@pytest.mark.cluster
def test_a_stage_no_node_can_hold_is_refused_before_any_work(two_nodes, tmp_path):
    """A worker asking for more GPUs than any node has would wait forever; the run is
    refused at once, in one line naming the key, and nothing is written."""
    raw = gpu_cluster_config(tmp_path / "store")
    raw["stages"] = raw["stages"][:5]
    raw["stages"][4]["resources"]["gpus"] = GPUS + 1
    run = run_on(two_nodes, raw, tmp_path / "big.yaml", timeout=120)
    assert run.returncode != 0
    assert (f"stages.4.resources.gpus: a worker of clip_embed asks for {GPUS + 1} GPUs, but "
            f"no node of the cluster has more than {GPUS}") in run.stdout + run.stderr
    runs = lancedb.connect(str(tmp_path / "store")).table_names()
    assert "samples_runs" not in runs or not lancedb.connect(str(tmp_path / "store")) \
        .open_table("samples_runs").count_rows()
