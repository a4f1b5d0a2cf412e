"""Shared fixtures: one real local Ray for the whole session, real photos, temp stores."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO_MEDIA = ROOT / "examples" / "media"


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance shared by every test that runs a pipeline."""
    import ray

    from curate.engine.backend import connect

    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    connect(num_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """24 photo-like 640x480 JPEGs made from real photos."""
    from curate.media.samples import write_photos

    directory = tmp_path_factory.mktemp("photos")
    write_photos(directory, 24, size=(640, 480), seed=1)
    return directory


@pytest.fixture()
def demo_media(tmp_path) -> Path:
    """A private copy of examples/media (tests may add or change files)."""
    target = tmp_path / "media"
    shutil.copytree(DEMO_MEDIA, target)
    return target


def tiny_models() -> Path:
    """examples/models: the stand-in models the demo uses (built once, as `make` does)."""
    from curate.models.tiny import build_all

    out = ROOT / "examples" / "models"
    if not (out / ".built").is_file():
        build_all(out)
        (out / ".built").touch()
    return out


def gpu_cluster_config(store: Path) -> dict:
    """configs/gpu-cluster.yaml as written (its stages, resources and thresholds), with
    the stand-in models for the hub's, this machine's engine for vLLM, the demo's photos
    for the manifest, and a local store."""
    import yaml

    models = tiny_models()
    raw = yaml.safe_load((ROOT / "configs" / "gpu-cluster.yaml").read_text())
    raw["store"] = {"uri": str(store)}
    stages = {s["type"]: s for s in raw["stages"]}
    stages["ingest_images"]["paths"] = [str(ROOT / "examples" / "media" / "photos")]
    stages["clip_embed"]["model"] = str(models / "tiny-clip")
    for kind in ("caption", "vlm_score"):
        stages[kind].update(model=str(models / "tiny-llava"), engine="transformers",
                            max_new_tokens=4)
        stages[kind].pop("vllm")
    # this machine's onnxruntime has no CUDA provider: open_nsfw holding GPUs is refused
    # (test_models.py), so it runs on CPU here
    stages["nsfw_score"]["resources"] = {"batch_size": 128}
    stages["image_quality"]["min_side"] = 64  # the photos are small
    stages["clip_score"]["min_score"] = -1.0  # random embeddings: keep every row
    return raw


def demo_config(media: Path, store: Path, **run) -> dict:
    """The demo pipeline as a dict, pointed at `media` and `store`."""
    import yaml

    models = tiny_models()
    raw = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    for stage in raw["stages"]:
        for key in ("model", "weights"):
            if str(stage.get(key, "")).startswith("examples/models/"):
                stage[key] = str(models / stage[key].removeprefix("examples/models/"))
    raw["stages"][0]["paths"] = [str(media)]
    raw["store"]["uri"] = str(store)
    raw.setdefault("run", {}).update(run)
    return raw


@pytest.fixture(scope="session")
def demo_store(ray_session, tmp_path_factory) -> Path:
    """The demo pipeline run once on a copy of examples/media; tests that change the table
    take a copy (`copy_store`)."""
    from curate.config import load_config
    from curate.pipeline import Pipeline

    root = tmp_path_factory.mktemp("demo-store")
    shutil.copytree(DEMO_MEDIA, root / "media")
    Pipeline.from_config(load_config(demo_config(root / "media", root / "store"))).run(
        progress=False)
    return root / "store"


def copy_store(store: Path, target: Path) -> Path:
    shutil.copytree(store, target)
    return target


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve_settings(store: Path, **extra) -> dict:
    """A serve config for tests: small CPU shares (two cores), models scaled to zero."""
    settings = {
        "store": {"uri": str(store)}, "port": free_port(), "ingress": {"cpus": 0},
        "default_model": {"cpus": 0.1, "autoscaling": {"min_replicas": 0, "max_replicas": 1,
                                                       "downscale_delay_s": 600}},
        "limits": {"requests_per_second": None},
        "search": {"index_min_rows": 10, "refresh_s": 2},
    }
    settings.update(extra)
    return settings


@pytest.fixture(scope="module")
def served(ray_session, demo_store, tmp_path_factory):
    """A real Serve app on a private copy of the demo table: (base URL, store path)."""
    from curate.serve.config import load_serve_config
    from curate.serve.server import start, stop

    store = copy_store(demo_store, tmp_path_factory.mktemp("served") / "store")
    url = start(load_serve_config(serve_settings(store)))
    yield url, store
    stop()


def family_of(pid: int) -> list:
    """The processes `pid` started (psutil), and the members of its process group."""
    import psutil

    try:
        family = psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for process in psutil.process_iter():
        try:
            if process.pid != pid and os.getpgid(process.pid) == pid:
                family.append(process)
        except (ProcessLookupError, PermissionError):
            pass
    return list({p.pid: p for p in family}.values())


def still_running(processes: list, seconds: float = 10) -> list[str]:
    """Those of `processes` (psutil) still running after up to `seconds` (zombies, whose
    parent has not reaped them, count as gone): "pid name" each."""
    import time

    import psutil

    def running() -> list[str]:
        out = []
        for process in processes:
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    out.append(f"{process.pid} {process.name()}")
            except psutil.Error:
                pass
        return out

    until = time.monotonic() + seconds
    while running() and time.monotonic() < until:
        time.sleep(0.25)
    return running()


def kill_family(process, family: list = ()) -> None:
    """SIGKILL `process` (a Popen), its process group, what it started and `family`."""
    import signal

    import psutil

    family = [*family, *family_of(process.pid)]
    for kill in (lambda: os.killpg(process.pid, signal.SIGKILL), process.kill):
        try:
            kill()
        except (ProcessLookupError, PermissionError):
            pass
    for member in family:
        try:
            member.kill()  # psutil: never a reused pid
        except psutil.Error:
            pass
    try:
        process.communicate(timeout=30)
    except Exception:  # pipes held open by a grandchild that is gone now
        pass


class Spawned:
    """Subprocesses a test started, and the processes they were seen to start."""

    def __init__(self):
        self.started: list = []
        self.seen: list = []

    def __call__(self, args, **popen):
        """Start `args` (subprocess.Popen) in a session of its own."""
        import subprocess

        popen.setdefault("start_new_session", True)
        process = subprocess.Popen(args, **popen)
        self.started.append(process)
        return process

    def family(self, process) -> list:
        """What `process` runs now (psutil processes), remembered for the finalizer: a
        worker whose parent died is no longer found below it."""
        family = family_of(process.pid)
        self.seen += family
        return family

    def stop_all(self) -> None:
        for process in self.started:
            kill_family(process, self.seen)


@pytest.fixture()
def spawn():
    """`spawn(args, **popen)`: a subprocess in a session of its own. Whatever the test's
    outcome, the finalizer kills it, its process group and every process it was seen to
    start (Ray's workers put themselves in groups of their own), so a failing test leaves
    none behind."""
    spawned = Spawned()
    yield spawned
    spawned.stop_all()


#: The bucket the `s3` fixture makes.
BUCKET = "curate-test"


def start_moto_s3(bucket: str):
    """A moto S3 server on 127.0.0.1 that checks signatures, with `bucket` made: (the
    server, the storage options (endpoint, region, a user's keys, plain http) that reach
    it)."""
    import json

    import boto3
    from moto import settings
    from moto.server import ThreadedMotoServer

    # the first requests set up a user, its key and the bucket; every later one is signed
    # and checked
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 4
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    setup = {"endpoint_url": endpoint, "region_name": "us-east-1"}
    iam = boto3.client("iam", aws_access_key_id="setup", aws_secret_access_key="setup",
                       **setup)
    iam.create_user(UserName="curate")
    key = iam.create_access_key(UserName="curate")["AccessKey"]
    iam.put_user_policy(UserName="curate", PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17",
         "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    boto3.client("s3", aws_access_key_id=key["AccessKeyId"],
                 aws_secret_access_key=key["SecretAccessKey"], **setup
                 ).create_bucket(Bucket=bucket)
    return server, {"aws_endpoint": endpoint, "aws_region": "us-east-1", "allow_http": "true",
                    "aws_access_key_id": key["AccessKeyId"],
                    "aws_secret_access_key": key["SecretAccessKey"]}


@pytest.fixture(scope="session")
def s3():
    """`start_moto_s3` with BUCKET, for the session."""
    server, options = start_moto_s3(BUCKET)
    yield options
    server.stop()


class FlakyEndpoint:
    """An HTTP proxy on loopback in front of the S3 server that answers `503 SlowDown` to
    the requests `fail(number, method, path)` picks and forwards the others unchanged
    (the Host header too, so signatures still hold), each after `delay_s` seconds."""

    SLOW_DOWN = (b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate."
                 b"</Message></Error>")

    def __init__(self, options: dict, fail, delay_s: float = 0.0):
        import http.client
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        target = int(options["aws_endpoint"].rsplit(":", 1)[1])
        self.requests = self.failed = 0
        self.delay_s = delay_s
        lock, proxy = threading.Lock(), self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with lock:
                    proxy.requests += 1
                    refuse = fail(proxy.requests, self.command, self.path)
                    proxy.failed += bool(refuse)
                time.sleep(proxy.delay_s)
                if refuse:
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(proxy.SLOW_DOWN)))
                    self.end_headers()
                    self.wfile.write(proxy.SLOW_DOWN)
                    return
                server = http.client.HTTPConnection("127.0.0.1", target, timeout=60)
                server.request(self.command, self.path, body=body, headers=dict(self.headers))
                answer = server.getresponse()
                data = answer.read()
                server.close()
                self.send_response(answer.status)
                for key, value in answer.getheaders():  # a HEAD keeps the object's length
                    if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(key, value)
                self.send_header("Content-Length", answer.getheader("Content-Length")
                                 if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.options = {**options, "aws_endpoint":
                        f"http://127.0.0.1:{self.server.server_address[1]}"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
