"""Stopping `curate serve` and `curate run` promptly and surely, with every process they
started.

A command wrapped in `on_signals()` takes SIGINT (Ctrl-C) and SIGTERM itself, whatever the
process inherited: a shell starts background jobs with SIGINT ignored, and `ray.init`
installs its own SIGTERM handlers (`connect` in curate.engine.ray_stream hands them back here).

- The first signal raises KeyboardInterrupt in the main thread: a run records itself as
  interrupted and keeps what it committed, `curate serve` shuts Serve down.
- When the command's block ends (for any reason), Ray is shut down, and the processes this
  one started (the local Ray cluster's GCS, raylet, dashboard, agents and workers, found as
  descendants of this process) are waited for; any still running a few seconds after Ray
  said it was done are killed, and the user is told so in one line.
- A deadline (`CURATE_STOP_TIMEOUT`, seconds, default 15) runs from the first signal, or
  from the start of the shutdown: past it, or at a second signal, a watcher thread kills
  what is left, says so in one line and ends the process. The watcher hears signals
  through `signal.set_wakeup_fd`, so it acts even while the main thread is held in a
  library call that does not return.

Only descendants are killed: never the process group (a shell pipeline shares it) and
never a cluster joined with `--address` (its processes are not ours).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEADLINE_ENV = "CURATE_STOP_TIMEOUT"
DEFAULT_DEADLINE_S = 15.0
#: After Ray's shutdown returned: how long its processes may take to exit before they are
#: taken for orphans and killed.
GRACE_S = 3.0
#: Written to the wakeup socket by the main thread: the shutdown began (no signal).
_BEGIN = b"\0"

#: A process: (pid, start time) names it even if its pid is reused later.
Key = tuple[int, str]


def deadline_s() -> float:
    """Seconds a stop may take before the rest is killed (`CURATE_STOP_TIMEOUT`)."""
    try:
        value = float(os.environ.get(DEADLINE_ENV, DEFAULT_DEADLINE_S))
    except ValueError:
        return DEFAULT_DEADLINE_S
    return value if value > 0 else DEFAULT_DEADLINE_S


# --- processes (stdlib: /proc on Linux, `ps` elsewhere) ---------------------------------
# psutil would list them too, but it is only a test dependency; reading /proc is all this
# needs (parents, start times, names), so the package does not gain a dependency for it.


def _table() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, start time, name) of every process visible here."""
    out: dict[int, tuple[int, str, str]] = {}
    if os.path.isdir("/proc/self"):
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read().decode(errors="replace")
            except OSError:  # gone meanwhile
                continue
            name = stat[stat.find("(") + 1:stat.rfind(")")]
            fields = stat[stat.rfind(")") + 2:].split()
            if fields[0] == "Z":  # a zombie holds no resources; its parent reaps it
                continue
            out[int(entry)] = (int(fields[1]), fields[19], name)
        return out
    try:
        listing = subprocess.run(["ps", "-A", "-o", "pid=,ppid=,comm="], capture_output=True,
                                 text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return out
    for line in listing.splitlines():
        parts = line.split(None, 2)
        if len(parts) == 3 and parts[0].isdigit() and parts[1].isdigit():
            out[int(parts[0])] = (int(parts[1]), "", os.path.basename(parts[2]))
    return out


def _name(pid: int, fallback: str) -> str:
    """A readable name: Ray's workers set their title (ray::ServeReplica:...)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return fallback
    args = [a.decode(errors="replace") for a in raw.split(b"\0") if a]
    if not args or not args[0].strip():
        return fallback
    if args[0].startswith("ray::"):
        return args[0].split()[0]
    program = os.path.basename(args[0])
    if program.startswith("python"):  # Ray's Python processes: name the script
        script = next((a for a in args[1:] if a.endswith(".py")), None)
        if script:
            return os.path.basename(script)
    return program


def descendants(root: int | None = None) -> dict[Key, str]:
    """Every running process below `root` (default: this one): (pid, start) -> name."""
    root = os.getpid() if root is None else root
    table = _table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[Key, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        _, start, name = table[pid]
        out[(pid, start)] = _name(pid, name)
        todo += children.get(pid, [])
    return out


def alive(family: dict[Key, str]) -> dict[Key, str]:
    """The processes of `family` still running (the same processes, not reused pids)."""
    table = _table()
    return {key: name for key, name in family.items()
            if key[0] in table and table[key[0]][1] == key[1]}


def kill(family: dict[Key, str], sig: int = signal.SIGKILL) -> None:
    for pid, _ in family:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _names(family: dict[Key, str], most: int = 6) -> str:
    names = sorted(family.values())
    more = f" and {len(names) - most} more" if len(names) > most else ""
    return ", ".join(names[:most]) + more


# --- the stop -----------------------------------------------------------------------------


class _Stop:
    """State of one command's stop: the signals seen, the deadline, the family."""

    def __init__(self, deadline: float):
        self.deadline = deadline
        self.lock = threading.RLock()  # the main thread's signal handler takes it too
        self.signum: int | None = None  # the first signal, as the watcher heard it
        self.raised = False  # the main thread got its KeyboardInterrupt
        self.shutting_down = False
        self.began: float | None = None  # monotonic time the deadline runs from
        self.family: dict[Key, str] = {}
        self.done = threading.Event()
        self.exit_code = 1
        self.terminal = os.dup(2)  # stays the terminal while libraries' output is logged
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)
        self.previous = {s: signal.getsignal(s) for s in SIGNALS}
        self.previous_wakeup = signal.set_wakeup_fd(self.writer.fileno(),
                                                    warn_on_full_buffer=False)
        self.claim()
        self.watcher = threading.Thread(target=self._watch, name="curate-stop", daemon=True)
        self.watcher.start()

    def claim(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, self.on_signal)

    def on_signal(self, signum, frame) -> None:
        """Main thread: the first signal interrupts the command; later ones are the
        watcher's (it kills what is left at once)."""
        with self.lock:
            first = not self.raised and not self.shutting_down
            self.raised = True
            if self.signum is None:
                self.signum = signum
        if first:
            raise KeyboardInterrupt

    def tell(self, line: str) -> None:
        try:
            os.write(self.terminal, f"curate: {line}\n".encode())
        except OSError:
            pass

    # watcher thread
    def _watch(self) -> None:
        hurry = False
        while not self.done.is_set():
            timeout = 0.5
            if self.began is not None:
                timeout = min(timeout, max(0.0, self.began + self.deadline - time.monotonic()))
            ready, _, _ = select.select([self.reader], [], [], timeout)
            if ready:
                try:
                    data = self.reader.recv(64)
                except (BlockingIOError, InterruptedError):
                    data = b""
                for byte in data:
                    hurry |= self._heard(byte)
            if self.done.is_set():
                return
            late = self.began is not None and time.monotonic() >= self.began + self.deadline
            if hurry or late:
                self._force("signalled again while stopping" if hurry else
                            f"stopping took over {self.deadline:g} s ({DEADLINE_ENV})")

    def _heard(self, byte: int) -> bool:
        """A signal (or the shutdown's start, 0) reached the watcher; True: stop now.
        Other signals with a Python handler (a stage's SIGALRM, SIGCHLD) write to the same
        wakeup socket: they are not a stop."""
        if byte and byte not in SIGNALS:
            return False
        with self.lock:
            if byte and self.signum is None:
                self.signum = byte
            again = byte != 0 and self.began is not None
            if self.began is None:
                self.began = time.monotonic()
        if not again:
            self.remember()  # before Ray's processes lose their parents
        return again

    def remember(self) -> dict[Key, str]:
        """Add the descendants running now to the family; returns the whole family."""
        now = descendants()
        with self.lock:
            self.family.update(now)
            return dict(self.family)

    def _force(self, why: str) -> None:
        """Kill what this process started and end it, now."""
        family = alive(self.remember())
        kill(family)
        what = (f"killed {len(family)} processes it started ({_names(family)}) and exited"
                if family else "exited without waiting further")
        self.tell(f"{why}: {what}")
        code = 128 + self.signum if self.signum else self.exit_code
        os._exit(code)

    # main thread
    def begin(self) -> None:
        with self.lock:
            self.shutting_down = True
        try:
            self.writer.send(_BEGIN)
        except OSError:
            pass

    def shutdown(self) -> None:
        """Shut Ray down, then make sure every process this one started is gone."""
        self.begin()
        family = self.remember()
        ray = sys.modules.get("ray")
        if ray is not None:
            try:
                if ray.is_initialized():
                    ray.shutdown()
            except Exception:  # a cluster that is already gone: its processes are below
                pass
        left = self._wait(alive(family), GRACE_S)
        if left:
            kill(left, signal.SIGTERM)
            left = self._wait(left, 1.0)
            kill(left)
            self.tell(f"killed {len(left)} processes it started that were still running "
                      f"after the shutdown ({_names(left)})")

    def _wait(self, family: dict[Key, str], seconds: float) -> dict[Key, str]:
        until = time.monotonic() + seconds
        while family and time.monotonic() < until:
            time.sleep(0.1)
            family = alive(family)
        return family

    def close(self) -> None:
        self.done.set()
        with contextlib.suppress(OSError, ValueError):
            signal.set_wakeup_fd(self.previous_wakeup)
        for sig, handler in self.previous.items():
            with contextlib.suppress(OSError, ValueError, TypeError):
                signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self.watcher.join(timeout=1)
        for closing in (self.reader.close, self.writer.close,
                        lambda: os.close(self.terminal)):
            with contextlib.suppress(OSError):
                closing()


_current: _Stop | None = None


def active() -> bool:
    """True while a command runs under `on_signals` (SIGTERM then interrupts like Ctrl-C)."""
    return _current is not None


def reclaim() -> None:
    """Take SIGINT and SIGTERM back after a library installed its own (ray.init does)."""
    if _current is not None and threading.current_thread() is threading.main_thread():
        _current.claim()


def received() -> int | None:
    """The first SIGINT or SIGTERM the command got, if any."""
    return _current.signum if _current is not None else None


def heard(signum: int) -> None:
    """A handler that stands in for this module's for a while (see curate.engine.run) got
    `signum`: the command was interrupted by it."""
    if _current is not None:
        with _current.lock:
            _current.raised = True
            if _current.signum is None:
                _current.signum = signum


def exit_code(default: int = 130) -> int:
    """How a command that was interrupted exits: 128 + the signal (130 Ctrl-C, 143
    SIGTERM)."""
    signum = received()
    return 128 + signum if signum else default


@contextlib.contextmanager
def on_signals() -> Iterator[None]:
    """Within: SIGINT and SIGTERM interrupt the block (KeyboardInterrupt); at its end Ray is
    shut down and every process this one started is gone, within the deadline."""
    global _current
    if _current is not None or threading.current_thread() is not threading.main_thread():
        yield
        return
    stop = _current = _Stop(deadline_s())
    try:
        yield
        stop.exit_code = 0
    except BaseException as exc:  # typer.Exit and SystemExit carry the command's code
        code = getattr(exc, "exit_code", getattr(exc, "code", 1))
        stop.exit_code = code if isinstance(code, int) else 1
        raise
    finally:
        try:
            stop.shutdown()
        finally:
            _current = None
            stop.close()
