"""`curate submit`: run a config as a Ray job on a cluster through the Jobs SDK."""

from __future__ import annotations

import asyncio
import os
import shlex
import time
from importlib.metadata import PackageNotFoundError, requires
from pathlib import Path

from rich.console import Console

import curate
from curate.config import load_config
from curate.errors import CurateError

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


def default_requirements() -> list[str]:
    """curate's own runtime requirements, as installed here."""
    try:
        reqs = requires("curate") or []
    except PackageNotFoundError:
        return []
    return [r.split(";")[0].strip() for r in reqs if "extra ==" not in r]


def build_job(config: Path, working_dir: Path, overrides: list[str],
              pip: list[str] | None, install: bool) -> tuple[str, dict]:
    """The entrypoint and runtime_env of the job that runs `config`."""
    working_dir = working_dir.resolve()
    config = config.resolve()
    try:
        rel = config.relative_to(working_dir)
    except ValueError:
        raise CurateError(f"config {config} is not inside the working directory {working_dir}; "
                          "pass --working-dir with a folder that holds it") from None
    overrides = list(overrides)
    store_uri = load_config(config, overrides).store.uri
    if "://" not in store_uri and not os.path.isabs(store_uri):
        # A relative store would land in the job's temporary copy of the working dir.
        overrides.append(f"store.uri={(Path.cwd() / store_uri).resolve()}")
    args = ["python", "-m", "curate", "run", str(rel), "--no-progress"]
    for item in overrides:
        args += ["--set", item]
    runtime_env: dict = {
        "working_dir": str(working_dir),
        "excludes": EXCLUDES,
        "py_modules": [str(Path(curate.__file__).parent)],
    }
    if install:
        runtime_env["pip"] = pip or default_requirements()
    return shlex.join(args), runtime_env


def submit_run(config: Path, address: str, overrides: list[str], wait: bool,
               working_dir: Path, pip: list[str] | None, install: bool,
               console: Console) -> int:
    """Submit; with `wait`, stream logs and return 0 if the job succeeded, else 1."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    entrypoint, runtime_env = build_job(config, working_dir, overrides, pip, install)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        client = JobSubmissionClient(address, headers=headers)
        job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env,
                                   metadata={"curate_config": str(config)})
    except AuthenticationError as exc:
        raise CurateError(
            f"the cluster at {address} refused the job: {str(exc).splitlines()[0]}. Make the "
            "cluster's token available here: RAY_AUTH_TOKEN, a file named by "
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
