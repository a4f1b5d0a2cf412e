"""Apply a moved limit from the gallery: the last run's config with one limit moved
(Catalog.moved_config) becomes a new config version, recorded in `<table>_runs` (kind
`apply`: who, what changed, the YAML), and `curate run` runs it in a process the front
starts, exactly as a person would run the edited file. It takes the table's lease like
any run, so an apply waits for no one: while a run holds the table it is refused (409).
With incremental runs, a moved limit decides the verdicts again from the stored scores
and computes only the rows that enter.

The run's process starts in `workdir` (where `curate serve` started: relative paths of
the config resolve as they did for the run that recorded it). When the run goes to Ray
(a large table, a GPU stage) it joins the cluster this front runs on.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

from curate.catalog import Catalog, CatalogError
from curate.config import Config
from curate.reviews import ReviewError, checked_reviewer
from curate.table.layout import now
from curate.table.lease import RunLease, process_alive, process_identity

log = logging.getLogger(__name__)

APPLY = "apply"
#: The end of a failed run's output kept in its apply record (`output`).
LOG_TAIL = 4000


def _address() -> str | None:
    """The Ray cluster this process runs on (None outside Ray)."""
    import ray

    return ray.get_runtime_context().gcs_address if ray.is_initialized() else None


class Applies:
    """Starts applies and answers what became of them (from the runs table, so every
    front replica knows every apply)."""

    def __init__(self, catalog: Catalog, workdir: str | None):
        self.catalog = catalog
        self.workdir = workdir or os.getcwd()
        self._lock = threading.Lock()
        self._running: str | None = None  # the apply this replica's process runs

    @property
    def store(self):
        return self.catalog.store

    def start(self, name: str, value: float, by: str | None) -> dict[str, Any]:
        """Record the moved config as a new version and start its run; the apply's
        record (status `running`)."""
        try:
            by = checked_reviewer(by)
        except ReviewError as exc:
            raise CatalogError(422, str(exc)) from None
        config, change = self.catalog.moved_config(name, value)
        with self._lock:
            self._refuse_if_busy(None)
            apply_id = f"apply-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-" \
                       f"{secrets.token_hex(2)}"
            last = self.catalog.last_run() or {}
            record = {
                "run_id": apply_id, "kind": APPLY, "pipeline": config.name,
                "status": "running", "config_hash": config.config_hash(),
                "config_yaml": config.to_yaml(), "started_at": now(),
                "version_before": self.catalog.version(),
                "stages_json": {"change": change, "by": by,
                                "parent": last.get("run_id"), "run": None,
                                "process": process_identity(os.getpid())},
            }
            self.store.save_run(record)
            try:  # another front replica may have recorded one meanwhile: the first wins
                self._refuse_if_busy(apply_id)
            except CatalogError:
                record.update(status="refused", finished_at=now(),
                              error="another apply started at the same time")
                self.store.save_run(record)
                raise
            self._running = apply_id
        threading.Thread(target=self._run, args=(record, config), daemon=True,
                         name=f"curate-{apply_id}").start()
        return _public(record)

    def _refuse_if_busy(self, mine: str | None) -> None:
        """409 while an apply (but `mine`, and those started after it) or a run holds the
        table."""
        if self._running is not None and self._running != mine:
            raise CatalogError(409, f"apply {self._running} is still running; wait for its "
                               f"end (GET /applies/{self._running})")
        applies = [_public(r) for r in self.store.runs(APPLY)]  # oldest first
        if mine is not None:  # of two recorded at once, the one recorded first goes on
            applies = applies[:[a["apply_id"] for a in applies].index(mine)]
        running = [a for a in applies if a["status"] == "running"]
        if running:
            first = running[0]["apply_id"]
            raise CatalogError(409, f"apply {first} is still running; wait for its end (GET "
                               f"/applies/{first})")
        holder = RunLease(self.store, APPLY).holder()
        if holder is not None:
            raise CatalogError(409, f"the table is busy: run {holder.run_id} on host "
                               f"{holder.host} (pid {holder.pid}) holds it; apply again when "
                               "it has ended")

    def _command(self, config: Config, folder: Path) -> tuple[list[str], dict[str, str]]:
        path = folder / "config.yaml"
        # the secrets the run needs, in a file only this user reads, removed after the run
        path.write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        path.chmod(0o600)
        # as `curate run` would start from a shell: not inside this Ray worker (Ray sets
        # RAY_ADDRESS, and OMP_NUM_THREADS to the worker's CPUs, for its workers)
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",
                                                                "OMP_NUM_THREADS")}
        address = _address()
        if address and not config.run.ray_address:
            env["CURATE_RAY_ADDRESS"] = address  # joined only if the run goes to Ray
        return [sys.executable, "-m", "curate", "run", str(path), "--no-progress",
                "--json", str(folder / "summary.json")], env

    def _run(self, record: dict[str, Any], config: Config) -> None:
        folder = Path(tempfile.mkdtemp(prefix="curate-apply-"))
        started = time.monotonic()
        code, summary, output, problem = None, {}, "", None
        try:
            command, env = self._command(config, folder)
            with open(folder / "output.log", "wb") as out:
                child = subprocess.Popen(command, cwd=self.workdir, env=env, stdout=out,
                                         stderr=subprocess.STDOUT)
                record["stages_json"]["process"] = process_identity(child.pid)
                self.store.save_run(record)
                code = child.wait()
            output = (folder / "output.log").read_bytes()[-LOG_TAIL:].decode("utf-8", "replace")
            summary_path = folder / "summary.json"
            summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        except Exception as exc:
            problem = f"`curate run` could not be started or followed: {exc}"
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        ok = problem is None and code == 0 and summary.get("status") in ("finished",
                                                                         "up_to_date")
        if not ok and problem is None:
            last = next((line for line in reversed(output.splitlines()) if line.strip()), "")
            problem = f"`curate run` ended with exit code {code}: {last.strip()}"
        record.update({
            "status": "finished" if ok else "failed", "finished_at": now(),
            "seconds": time.monotonic() - started,
            "version_after": summary.get("version_after"),
            "rows_total": summary.get("rows_total"),
            "rows_processed": summary.get("rows_processed"),
            "error": problem,
        })
        record["stages_json"] = {**record["stages_json"], "run": summary.get("run_id"),
                                 "selected": summary.get("selected"),
                                 "output": None if ok else output}
        try:
            self.store.save_run(record)
        except Exception as exc:  # the run's own record still says how it ended
            log.warning("apply %s ended (%s) but could not be recorded: %s",
                        record["run_id"], record["status"], exc)
        finally:
            with self._lock:
                self._running = None
            self.catalog.refresh()

    def get(self, apply_id: str) -> dict[str, Any]:
        found = [r for r in self.store.runs(APPLY) if r["run_id"] == apply_id]
        if not found:
            raise CatalogError(404, f"no apply {apply_id!r}")
        return _public(found[0], with_yaml=True)

    def list(self) -> list[dict[str, Any]]:
        """Every apply, newest first."""
        return [_public(r) for r in reversed(self.store.runs(APPLY))]


def _public(record: dict[str, Any], with_yaml: bool = False) -> dict[str, Any]:
    """An apply record as the API returns it. One still `running` whose process (that of
    the front that started it, then of its `curate run`) is gone is `lost`: the server
    stopped meanwhile (its run, if it started, is in the runs table)."""
    detail = record.get("stages_json") or {}
    if isinstance(detail, str):
        detail = json.loads(detail)
    status, error = record["status"], record.get("error")
    process = detail.get("process") or {}
    if status == "running" and process and process_alive(**process) is False:
        status, error = "lost", ("the process that ran this apply is gone (the server "
                                 "stopped while it ran); see the runs table for its run")
    out = {
        "apply_id": record["run_id"], "status": status,
        "change": detail.get("change"), "by": detail.get("by"),
        "parent_run": detail.get("parent"), "run": detail.get("run"),
        "selected": detail.get("selected"), "config_hash": record.get("config_hash"),
        "started_at": _iso(record.get("started_at")),
        "finished_at": _iso(record.get("finished_at")), "seconds": record.get("seconds"),
        "version_before": record.get("version_before"),
        "version_after": record.get("version_after"), "error": error,
    }
    if with_yaml:
        out["config_yaml"] = record.get("config_yaml")
        out["output"] = detail.get("output")
    return out


def _iso(value) -> str | None:
    return value.isoformat() if value is not None else None
