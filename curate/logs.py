"""Quiet, owned output: what Ray, Lance and FFmpeg print goes to a log file; curate's own
progress, summary and errors reach the terminal.

The libraries write to the process's stderr from C++ and Rust (Ray's core worker, Lance's
warnings) as well as from Python loggers bound to it at import, so the redirection is of
file descriptor 2 itself, and `sys.stderr` with it; curate prints to a copy of the
terminal's descriptor. `-v` leaves everything as it is.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

#: True while library output is captured: workers' prints are not relayed to the driver.
QUIET = False


def log_path(store_uri: str, table: str) -> Path:
    """Where a run's library log goes: `<store>/_logs/` for a local store, the temporary
    directory for an object store."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    if "://" in store_uri:
        folder = Path(tempfile.gettempdir()) / "curate-logs"
    else:
        folder = Path(store_uri).expanduser().resolve() / "_logs"
    return folder / f"{table}-{stamp}-{os.getpid()}.log"


@contextlib.contextmanager
def library_output_to(path: Path | None):
    """Within: fd 2 and `sys.stderr` go to `path`; yields a stream to the terminal for
    curate's own messages (None, and nothing changes, when `path` is None or cannot be
    written)."""
    global QUIET
    if path is None:
        yield None
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        log = open(path, "a", buffering=1)  # noqa: SIM115 (Ray's loggers keep it to the end)
    except OSError:  # an unwritable store: the run says so itself; keep the terminal
        yield None
        return
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(2), "w", buffering=1)
    os.dup2(log.fileno(), 2)
    previous, sys.stderr = sys.stderr, log
    QUIET = True
    try:
        yield terminal
    finally:
        QUIET = False
        log.flush()
        sys.stderr = previous
        os.dup2(terminal.fileno(), 2)
        terminal.close()
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()


def progress_bar(enabled: bool):
    """curate's own progress bar (a rich Progress; disabled: prints nothing)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )
