"""One run at a time on a table: the run lease.

A run holds the lease of its table from before its first write to its end. A second run
on the same table is refused with the holder's run id, host and age; a lease whose run
died (its process is gone, or it has been silent longer than the stale limit) is taken
over, so a killed run resumes with `curate run` again.

The lease is a sequence of tiny Lance datasets beside the table, `_leases/<table>/<n>`:
taking the lease is creating the next one. Lance's commit makes each version of a dataset
atomic (on local disks and on object stores alike), but not its creation: of two runs that
create the same dataset at once, the later one's create is committed as version 2, an
overwrite. So a slot belongs to the run that wrote its version 1, which only one run can
do, and of runs that race for the lease exactly one wins. The holder appends a heartbeat
row every `HEARTBEAT_S` and a release row at its end.

`curate serve` writes the features it computes for rows of the table under the same lease,
held for one short merge (`CACHE_RUN`): it takes the lease only when no one holds it
(`try_acquire`), and a run that finds such a hold waits for its end instead of being
refused, so browsing the gallery never stops a run nor a run's start.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

from curate.errors import RunError

HEARTBEAT_S = 30.0
#: A lease silent this long is taken over (its run is presumed dead).
STALE_AFTER_S = 600.0
#: Run ids of the short holds of `curate serve`'s feature cache start with this.
CACHE_RUN = "serve-cache-"
#: A feature-cache hold lasts one merge: a run waits this long for its end, and takes over
#: one silent this long (its process died on another host mid-merge).
CACHE_STALE_S = 60.0
#: How often a run waiting for a feature-cache hold looks again.
CACHE_POLL_S = 0.25


@dataclass
class Holder:
    run_id: str
    host: str
    pid: int
    pid_started: str  # the process's start time (tells a reused pid apart)
    started_at: float
    beat_at: float
    released: bool = False

    @property
    def is_cache(self) -> bool:
        """A short hold of `curate serve`'s feature cache, not a run."""
        return self.run_id.startswith(CACHE_RUN)


def _pid_started(pid: int) -> str:
    """The start time of a live process ("" when it is gone or a zombie, or off Linux)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return ""
    return "" if fields[0] in ("Z", "X") else fields[19]


def process_alive(host: str, pid: int, pid_started: str) -> bool | None:
    """Whether a process (its host, pid and `pid_started`) still runs; None when it runs
    on another host."""
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if not pid_started:  # no /proc where it ran: the pid exists, take it as alive
        return True
    return _pid_started(pid) == pid_started


def process_identity(pid: int) -> dict[str, Any]:
    """What `process_alive` needs to tell a process of this host later."""
    return {"host": socket.gethostname(), "pid": pid, "pid_started": _pid_started(pid)}


def _alive(holder: Holder) -> bool | None:
    """Whether the holder's process still runs; None when it runs on another host."""
    return process_alive(holder.host, holder.pid, holder.pid_started)


class RunLease:
    """The lease of one table for one run; a context manager."""

    def __init__(self, store, run_id: str, force_after_s: float | None = None):
        self.store = store
        self.run_id = run_id
        self.stale_after_s = STALE_AFTER_S if force_after_s is None else force_after_s
        self.folder = f"{store.uri.rstrip('/')}/_leases/{store.name}"
        self.slot: int | None = None
        self.me: Holder | None = None
        #: The lease this run took over from a dead run, if any.
        self.took_over: Holder | None = None
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- slots ----------------------------------------------------------------------------
    def _uri(self, slot: int) -> str:
        return f"{self.folder}/{slot:08d}.lance"

    def _open(self, slot: int, version: int | None = None):
        import lance

        try:
            return lance.dataset(self._uri(slot), version=version,
                                 storage_options=self.store.storage_options)
        except (ValueError, OSError):
            return None

    def _owner(self, slot: int) -> Holder | None:
        """The run that took the slot: the one whose create is the slot's version 1."""
        first = self._open(slot, version=1)
        rows = first.to_table(limit=1).to_pylist() if first is not None else []
        return Holder(**rows[0]) if rows else None

    def _read(self, slot: int) -> Holder | None:
        """The slot's holder as last heard from: its owner's newest heartbeat row."""
        owner = self._owner(slot)
        dataset = self._open(slot) if owner is not None else None
        if dataset is None:
            return owner
        count = dataset.count_rows()  # a row per heartbeat: only the last one is read
        rows = dataset.to_table(offset=count - 1, limit=1).to_pylist() if count else []
        last = Holder(**rows[0]) if rows else None
        # A racing create that lost overwrote the rows with its own, once, at the start;
        # only the owner appends after that. Until its next heartbeat, its first row stands.
        if last is None or (last.run_id, last.pid, last.host) != (owner.run_id, owner.pid,
                                                                  owner.host):
            return owner
        return last

    def _latest(self) -> int:
        """The highest slot taken (-1: none). Slots are never removed, so they run from 0
        without a gap: doubling, then bisection."""
        if self._open(0) is None:
            return -1
        low, high = 0, 1
        while self._open(high) is not None:
            low, high = high, high * 2
        while high - low > 1:
            middle = (low + high) // 2
            if self._open(middle) is None:
                high = middle
            else:
                low = middle
        return low

    def _write(self, slot: int, holder: Holder, mode: str) -> None:
        import lance
        import pyarrow as pa

        lance.write_dataset(pa.Table.from_pylist([asdict(holder)]), self._uri(slot),
                            mode=mode, storage_options=self.store.storage_options)

    # --- taking and giving back -------------------------------------------------------------
    def _stale(self, holder: Holder) -> bool:
        if holder.released:
            return True
        if _alive(holder) is False:
            return True
        limit = min(self.stale_after_s, CACHE_STALE_S) if holder.is_cache else \
            self.stale_after_s
        return time.time() - holder.beat_at > limit

    def _me(self) -> Holder:
        return Holder(self.run_id, socket.gethostname(), os.getpid(),
                      _pid_started(os.getpid()), time.time(), time.time())

    def _take(self, slot: int, holder: Holder | None, me: Holder) -> bool:
        """Create slot `slot + 1`; True when this lease got it (then it holds the lease),
        False when another run created it first."""
        try:
            self._write(slot + 1, me, "create")
        except (OSError, ValueError) as exc:
            if self._owner(slot + 1) is None:  # not taken by another run: a write failure
                raise self.store.write_error(exc) from None
            return False  # another run took that slot first
        if self._owner(slot + 1) != me:  # created at once by another run, which was first
            return False
        self.slot = slot + 1
        self.took_over = holder if holder is not None and not holder.released else None
        self.me = me
        self._thread = threading.Thread(target=self._beat, daemon=True, name="curate-lease")
        self._thread.start()
        return True

    def acquire(self) -> RunLease:
        me = self._me()
        waited_until = time.monotonic() + CACHE_STALE_S
        tries = 0
        while tries < 10:
            slot = self._latest()
            holder = self._read(slot) if slot >= 0 else None
            if holder is not None and not self._stale(holder):
                if holder.is_cache and time.monotonic() < waited_until:
                    time.sleep(CACHE_POLL_S)  # a merge of served features: over soon
                    continue
                raise RunError(_busy_message(self.store, holder))
            if self._take(slot, holder, me):
                return self
            tries += 1
            time.sleep(0.2)  # another run took that slot first: look again
        raise RunError(f"could not take the run lease of table {self.store.name} at "
                       f"{self.store.uri}: other runs keep taking it; run again")

    def try_acquire(self) -> bool:
        """Take the lease only when no one holds it, at once; False when someone does.
        A lease left by a run that died is not taken over here: the next run takes it
        over and records that run as interrupted. (A dead feature-cache hold is.)"""
        slot = self._latest()
        holder = self._read(slot) if slot >= 0 else None
        if holder is not None and not holder.released and not (holder.is_cache
                                                                and self._stale(holder)):
            return False
        return self._take(slot, holder, self._me())

    def holder(self) -> Holder | None:
        """The run that holds the lease now (None: a run could take it). A short hold of
        the feature cache is not a run."""
        slot = self._latest()
        holder = self._read(slot) if slot >= 0 else None
        if holder is None or holder.is_cache or self._stale(holder):
            return None
        return holder

    def held(self) -> bool:
        """Whether this lease is still the table's (no run took it over since)."""
        return self.slot is not None and not self.lost.is_set() \
            and self._latest() == self.slot

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S) and not self.lost.is_set():
            self._beat_once()

    def _beat_once(self) -> None:
        """Say this run is alive, unless a run took the lease over (--force-after)."""
        try:
            if self._latest() != self.slot:
                self.lost.set()
                return
            self.me.beat_at = time.time()
            self._write(self.slot, self.me, "append")
        except (OSError, ValueError):
            pass  # a missed beat; the next one may get through

    def check(self) -> None:
        """Raise when another run took this run's lease over: it must not write on."""
        if self.lost.is_set():
            raise RunError(f"run {self.run_id} lost the lease of table {self.store.name} to "
                           "another run that took it over (--force-after); its finished "
                           "batches are kept, and that run carries on")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.slot is None or self.lost.is_set():
            return
        self.me.released = True
        self.me.beat_at = time.time()
        try:
            self._write(self.slot, self.me, "append")
        except (OSError, ValueError):
            pass  # then its process ending frees it: the next run sees the pid gone
        self.slot = None

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _busy_message(store, holder: Holder) -> str:
    if holder.is_cache:
        return (f"curate serve on host {holder.host} (pid {holder.pid}) has been writing "
                f"computed features into table {store.name} at {store.uri} for "
                f"{time.time() - holder.started_at:.0f} s. Run again in a minute.")
    started = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(holder.started_at))
    silent = time.time() - holder.beat_at
    return (f"run {holder.run_id} started at {started} on host {holder.host} (pid "
            f"{holder.pid}) is still running on table {store.name} at {store.uri} (last "
            f"heard from {silent:.0f} s ago). Wait for it to end; if it died on another "
            f"host, pass --force-after 120 to take over a lease silent for longer than "
            f"120 s (a live run is heard from every {HEARTBEAT_S:.0f} s).")
