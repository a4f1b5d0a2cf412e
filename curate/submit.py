"""`curate submit`: run a config as a Ray job on a cluster through the Jobs SDK."""

from __future__ import annotations

import asyncio
import glob
import os
import re
import shlex
import tempfile
import time
import zipfile
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

from rich.console import Console

import curate
from curate.config import Config, load_config
from curate.errors import CurateError
from curate.registry import get_stage_class

#: Never uploaded with the working directory.
EXCLUDES = [".venv", ".git", "curate_data", "**/__pycache__", ".pytest_cache", "*.egg-info"]
_FINAL = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}


def auth_token() -> str | None:
    """The Ray cluster token, looked up where Ray itself looks for it."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), "~/.ray/auth_token"):
        if path and Path(path).expanduser().is_file():
            return Path(path).expanduser().read_text().strip()
    return None


def default_requirements(extras: tuple[str, ...] = ()) -> list[str]:
    """curate's own runtime requirements, as installed here, with those of `extras`."""
    try:
        reqs = requires("curate") or []
    except PackageNotFoundError:
        return []
    out = []
    for req in reqs:
        spec, _, marker = req.partition(";")
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if extra is None or extra.group(1) in extras:
            out.append(spec.strip())
    return list(dict.fromkeys(out))


def config_extras(config: Config) -> tuple[str, ...]:
    """The extras the config's stages need on the workers (`Stage.extras`)."""
    from curate.plan import build_stages

    return tuple(sorted({extra for stage in build_stages(config) for extra in stage.extras()}))


def config_local_paths(config: Config) -> list[tuple[str, str]]:
    """(key, value) of every local path the config's stages name (`local_path_params`),
    as written: `stages.4.model`, `stages.0.paths.1`, ..."""
    out = []
    for i, params in enumerate(config.stages):
        for key in get_stage_class(params.type).local_path_params:
            value = getattr(params, key)
            if isinstance(value, str):
                out.append((f"stages.{i}.{key}", value))
            elif isinstance(value, list):
                out.extend((f"stages.{i}.{key}.{j}", v) for j, v in enumerate(value)
                           if isinstance(v, str))
    return out


def files_to_ship(config: Config, working_dir: Path) -> list[str]:
    """The files (relative to `working_dir`, which must be resolved) that the config's
    relative local paths name: the job must get them even where `.gitignore` leaves
    them out (`examples/models/` is built, never committed). A relative path that leads
    out of the working directory is refused: the job would not see it. Absolute paths
    are used as they are (every node must see them there, e.g. a shared filesystem);
    URLs, hub ids and paths that do not exist here are left to the run."""
    files: set[str] = set()
    outside = []
    for key, value in config_local_paths(config):
        path = os.path.expanduser(value)
        if "://" in value or os.path.isabs(path):
            continue
        full = os.path.normpath(working_dir / path)  # `..` collapsed, symlinks kept
        if any(c in path for c in "*?["):
            matches = [os.path.normpath(m) for m in glob.glob(full, recursive=True)]
        else:
            matches = [full] if os.path.exists(full) else []
        for match in matches:
            if os.path.commonpath([match, working_dir]) != str(working_dir):
                outside.append(f"{key}: {value!r} is outside the working directory")
                break
            if os.path.isdir(match):
                for root, dirs, names in os.walk(match, followlinks=True):
                    dirs[:] = [d for d in dirs if d != "__pycache__"]
                    files.update(os.path.relpath(os.path.join(root, n), working_dir)
                                 for n in names)
            else:
                files.add(os.path.relpath(match, working_dir))
    if outside:
        raise CurateError(
            f"{'; '.join(outside)} {working_dir}, the only folder the job gets. Move what "
            "it names into that folder, pass --working-dir with a folder that holds it and "
            "the config, or name it by an absolute path that every node of the cluster sees")
    return sorted(Path(f).as_posix() for f in files)


def package_working_dir(working_dir: Path, files: list[str], target: Path) -> Path:
    """The working directory as Ray packs it (honouring .gitignore and .rayignore, minus
    Ray's default excludes and EXCLUDES), plus `files` that those rules left out."""
    from ray._private import ray_constants
    from ray._private.runtime_env.packaging import create_package

    include_gitignore = os.environ.get(ray_constants.RAY_RUNTIME_ENV_IGNORE_GITIGNORE) != "1"
    create_package(str(working_dir), target, include_gitignore=include_gitignore,
                   excludes=ray_constants.get_runtime_env_default_excludes() + EXCLUDES)
    with zipfile.ZipFile(target, "a") as package:
        packed = set(package.namelist())
        for name in files:
            if name not in packed:
                package.write(working_dir / name, name)
    return target


def build_job(config: Path, working_dir: Path, overrides: list[str],
              pip: list[str] | None, install: bool,
              scratch: Path | None = None) -> tuple[str, dict]:
    """The entrypoint and runtime_env of the job that runs `config`: curate's requirements
    and those of the extras its stages need (`pip` instead when given; none with
    `install` False, for nodes that have them). A container image per job (Ray's
    `image_uri`) cannot be offered: Ray takes it with no working_dir or py_modules, so
    neither the config nor curate's code would reach the job.

    The working directory is uploaded as the job's own; when the config names local
    files inside it (models, weights, manifests, media), it is packed here into
    `scratch` (default: a new temporary folder) with those files added even where
    .gitignore lists them, and that package is the job's working directory."""
    working_dir = working_dir.resolve()
    config = config.resolve()
    try:
        rel = config.relative_to(working_dir)
    except ValueError:
        raise CurateError(f"config {config} is not inside the working directory {working_dir}; "
                          "pass --working-dir with a folder that holds it") from None
    overrides = list(overrides)
    cfg = load_config(config, overrides)
    store_uri = cfg.store.uri
    if "://" not in store_uri and not os.path.isabs(store_uri):
        # A relative store would land in the job's temporary copy of the working dir.
        overrides.append(f"store.uri={(Path.cwd() / store_uri).resolve()}")
    args = ["python", "-m", "curate", "run", rel.as_posix(), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    runtime_env: dict = {
        "working_dir": str(working_dir),
        "excludes": EXCLUDES,
        "py_modules": [str(Path(curate.__file__).parent)],
    }
    files = files_to_ship(cfg, working_dir)
    if files:
        scratch = scratch or Path(tempfile.mkdtemp(prefix="curate-job-"))
        package = package_working_dir(working_dir, files, scratch / "working_dir.zip")
        runtime_env["working_dir"] = str(package)
        del runtime_env["excludes"]  # applied while packing
    if install:
        runtime_env["pip"] = pip or default_requirements(config_extras(cfg))
    return shlex.join(args), runtime_env


def submit_run(config: Path, address: str, overrides: list[str], wait: bool,
               working_dir: Path, pip: list[str] | None, install: bool,
               console: Console) -> int:
    """Submit; with `wait`, stream logs and return 0 if the job succeeded, else 1."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with tempfile.TemporaryDirectory(prefix="curate-job-") as scratch:  # the package, if any
        entrypoint, runtime_env = build_job(config, working_dir, overrides, pip, install,
                                            scratch=Path(scratch))
        try:
            client = JobSubmissionClient(address, headers=headers)
            job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                       metadata={"curate_config": str(config)})
        except AuthenticationError as exc:
            raise CurateError(
                f"the cluster at {address} refused the job: {str(exc).splitlines()[0]}. Make "
                "the cluster's token available here: RAY_AUTH_TOKEN, a file named by "
                "RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token") from None
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise CurateError(f"cannot submit to {address}: {exc}") from None
    console.print(f"submitted job [bold]{job_id}[/] to {address}")
    if not wait:
        console.print(f"follow it with: ray job logs --follow --address {address} {job_id}")
        return 0

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            console.out(chunk, end="", highlight=False)

    asyncio.run(tail())
    status = str(client.get_job_status(job_id)).split(".")[-1]
    while status not in _FINAL:  # the log stream can close a moment before the status
        time.sleep(0.5)
        status = str(client.get_job_status(job_id)).split(".")[-1]
    console.print(f"job {job_id}: {status}")
    return _FINAL[status]
