"""One run at a time per output: an atomic claim with a heartbeat.

A run claims its output before it changes anything there, by creating
``OUT/_zslabel/claim.json`` **exclusively**:

- local and mounted filesystems: ``open(..., O_CREAT | O_EXCL)`` (POSIX exclusive create);
- ``s3://`` (s3fs): a conditional PUT, ``If-None-Match: *`` (s3fs's ``"xb"`` mode; AWS S3 since
  2024-08, MinIO, moto);
- other object stores (``gs://``, ``az://``, ``memory://``...): no exclusive create is used
  here, so the claim is a *lease*: written when absent, then read back after a pause
  (``VERIFY_DELAY_S``) to see that it is still ours. Two runs starting within that pause on
  such a store can both pass; the heartbeat and the commit re-check below still stop the
  loser before it commits.

The claim records the run id, host, process id and a heartbeat time. The owner rewrites the
heartbeat every ``lease_s / 4`` seconds and, each time, checks that the claim is still its own;
the commit checks once more. A claim is **stale** (a crashed driver) when its heartbeat is older
than its lease, or at once when it was made on this host by a process that no longer exists. A
stale claim may be taken over; a live one makes a second run fail with one line naming it.

The lease defaults to ``DEFAULT_LEASE_S`` seconds; ``ZSLABEL_CLAIM_LEASE_S`` changes it (a run
on another host that crashed blocks the output for at most that long). Ray-free.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field

from ..errors import OutputError
from .layout import CLAIM_RECORD, STATE_DIR, OutputState, json_bytes, read_json_or_none, remove

log = logging.getLogger(__name__)

DEFAULT_LEASE_S = 120.0
LEASE_ENV = "ZSLABEL_CLAIM_LEASE_S"
VERIFY_DELAY_S = 1.0


class OutputInUse(OutputError):
    """Another live run holds the output's claim."""


def lease_seconds() -> float:
    """The claim lease in seconds (``ZSLABEL_CLAIM_LEASE_S``, else ``DEFAULT_LEASE_S``)."""
    try:
        return max(1.0, float(os.environ.get(LEASE_ENV, DEFAULT_LEASE_S)))
    except ValueError:
        return DEFAULT_LEASE_S


def _process_start(pid: int) -> str | None:
    """Start time of process ``pid`` (clock ticks since boot, from ``/proc``), so a reused pid
    is not mistaken for the claimant; None where ``/proc`` is not available or pid is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claim_is_stale(claim: dict, now: float | None = None) -> bool:
    """True when the claimant is gone: heartbeat older than its lease, or a process of this host
    that no longer runs (or whose pid now belongs to another process)."""
    now = time.time() if now is None else now
    if now - float(claim.get("heartbeat", 0)) > float(claim.get("lease_s", DEFAULT_LEASE_S)):
        return True
    if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int):
        pid = claim["pid"]
        if not _pid_alive(pid):
            return True
        started = claim.get("pid_start")
        return started is not None and _process_start(pid) not in (None, started)
    return False


def describe_claim(claim: dict) -> str:
    """``run R (host h, pid 12, started ..., last heartbeat 3 s ago)``."""
    age = time.time() - float(claim.get("heartbeat", 0))
    return (f"run {claim.get('run_id')} (host {claim.get('host')}, pid {claim.get('pid')}, started "
            f"{claim.get('started')}, last heartbeat {age:.0f} s ago)")


def check_not_claimed(state: OutputState, own_run: str | None = None) -> None:
    """Raise OutputInUse when ``state`` shows a live claim by a run other than ``own_run``."""
    claim = state.claim
    if claim and claim.get("run_id") != own_run and not claim_is_stale(claim):
        raise OutputInUse(f"output {state.uri} is being written by {describe_claim(claim)}; wait for it to "
                          "finish, or write to another --output (two runs never share an output)")


@dataclass
class Claim:
    """This run's claim on an output; heartbeats in a daemon thread until released.

    Attributes:
        run_id: the claiming run. method: how the claim was made ("exclusive-create",
            "conditional-put" or "lease"). lost: set when the heartbeat found another run's
            claim (this run must not commit).
    """

    state: OutputState
    run_id: str
    lease_s: float
    method: str
    record: dict
    lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)

    @property
    def path(self) -> str:
        return self.state.path(CLAIM_RECORD)

    def start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"zslabel-claim-{self.run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            try:
                current = read_json_or_none(self.state.fs, self.path)
                if (current or {}).get("run_id") != self.run_id:
                    self.lost = describe_claim(current) if current else "nobody (the claim was deleted)"
                    log.error("output %s: claim of run %s lost; now held by %s", self.state.uri, self.run_id, self.lost)
                    return
                self.record["heartbeat"] = time.time()
                with self.state.fs.open(self.path, "wb") as fh:
                    fh.write(json_bytes(self.record))
            except Exception as exc:  # noqa: BLE001 - a failed beat is retried; the lease allows 3 more
                log.warning("output %s: claim heartbeat failed: %s: %s", self.state.uri, type(exc).__name__, exc)

    def check(self) -> None:
        """Raise OutputError unless the claim on storage still names this run."""
        current = read_json_or_none(self.state.fs, self.path)
        if self.lost or (current or {}).get("run_id") != self.run_id:
            holder = self.lost or (describe_claim(current) if current else "nobody (the claim was deleted)")
            raise OutputError(f"output {self.state.uri}: run {self.run_id} lost its claim (now: {holder}); "
                              "its rows are not committed. Run again with --resume once the other run is done")

    def stop(self) -> None:
        """Stop heartbeating (before the commit removes the state folder, claim included)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def release(self) -> None:
        """Stop heartbeating and delete the claim if it is still this run's; remove the state
        folder when it is left empty."""
        self.stop()
        current = read_json_or_none(self.state.fs, self.path)
        if (current or {}).get("run_id") == self.run_id:
            remove(self.state, CLAIM_RECORD)
        remove_if_empty(self.state, STATE_DIR)


def remove_if_empty(state: OutputState, rel: str) -> None:
    """Remove the folder ``rel`` of the output when it holds nothing (object stores have no
    empty folders: nothing to do there)."""
    path = state.path(rel)
    try:
        if state.fs.isdir(path) and not state.fs.ls(path):
            state.fs.rmdir(path)
    except OSError:
        pass


def acquire(state: OutputState, run_id: str, lease_s: float | None = None) -> Claim:
    """Claim ``state``'s output for ``run_id`` (see the module docstring), taking over a stale
    claim; starts the heartbeat.

    Raises:
        OutputInUse: a live run holds the output (one line naming it).
        OutputError: the claim cannot be written.
    """
    lease_s = lease_seconds() if lease_s is None else lease_s
    now = time.time()
    record = {"run_id": run_id, "host": socket.gethostname(), "pid": os.getpid(),
              "pid_start": _process_start(os.getpid()), "lease_s": lease_s, "heartbeat": now,
              "started": datetime.datetime.now(datetime.timezone.utc).isoformat()}
    fs, path = state.fs, state.path(CLAIM_RECORD)
    for _ in range(3):
        existing = read_json_or_none(fs, path)
        if existing is not None:
            if existing.get("run_id") != run_id and not claim_is_stale(existing):
                raise OutputInUse(f"output {state.uri} is being written by {describe_claim(existing)}; wait for "
                                  "it to finish, or write to another --output (two runs never share an output)")
            log.warning("output %s: taking over the stale claim of %s", state.uri, describe_claim(existing))
            _discard(state, path, existing)
        try:
            method = _create_exclusive(fs, path, json_bytes(record))
        except FileExistsError:
            continue  # another run created it between our read and our create: look again
        except OSError as exc:
            raise OutputError(f"cannot claim output {state.uri}: {type(exc).__name__}: {exc}") from exc
        claim = Claim(state, run_id, lease_s, method, record)
        if method == "lease":
            time.sleep(VERIFY_DELAY_S)
            claim.check()
        claim.start_heartbeat()
        return claim
    raise OutputInUse(f"output {state.uri} is being claimed by other runs at the same time; try again")


def _create_exclusive(fs, path: str, data: bytes) -> str:
    """Create ``path`` with ``data`` only if it does not exist; returns the method used.

    Raises:
        FileExistsError: it exists.
    """
    from fsspec.implementations.local import LocalFileSystem

    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    if isinstance(fs, LocalFileSystem):
        local = fs._strip_protocol(path)
        fd = os.open(local, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        return "exclusive-create"
    if "s3" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        with fs.open(path, "xb") as fh:
            fh.write(data)
        return "conditional-put"
    if fs.exists(path):
        raise FileExistsError(path)
    with fs.open(path, "wb") as fh:
        fh.write(data)
    return "lease"


def _discard(state: OutputState, path: str, stale: dict) -> None:
    """Remove a stale claim, unless it changed since it was read (then another run is taking
    over: the exclusive create that follows decides). Locally, an atomic rename aside first, so
    that of two runs taking over, only one removes the stale claim."""
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(state.fs, LocalFileSystem):
        aside = f"{state.fs._strip_protocol(path)}.stale-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(state.fs._strip_protocol(path), aside)
        except FileNotFoundError:
            return
        with open(aside) as fh:
            try:
                moved = json.load(fh)
            except ValueError:
                moved = None
        if moved is not None and moved.get("run_id") != stale.get("run_id"):
            os.rename(aside, state.fs._strip_protocol(path))  # not the stale one: put it back
            return
        os.remove(aside)
        return
    if read_json_or_none(state.fs, path) == stale:
        remove(state, CLAIM_RECORD)
