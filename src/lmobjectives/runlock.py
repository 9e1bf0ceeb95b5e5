"""One writer per run directory: ``RUN/writer.lock``.

``flock`` alone does not do: it is per machine on many shared filesystems (NFS, Lustre),
and it vanishes with the process without saying who held it. So the lock is a small JSON
file ``{"pid", "host", "started", "renewed", "lease_s"}`` created with an exclusive
``os.link`` (atomic on local filesystems and NFS alike), and renewed by the holder (rank 0
of a training run) every ``lease_s / RENEW_FRACTION`` seconds from a daemon thread.

Another process that finds the file refuses to start, naming the holder's PID and host,
unless the holder is gone: on the same host, its PID no longer exists; on another host, the
lease has not been renewed for ``lease_s`` seconds (the holder cannot be asked directly).
A stale lock is taken over with a warning. Readers (``lmobj eval``, ``export``, ``verify``)
never look at it: every file a writer publishes is renamed into place whole.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from lmobjectives.errors import UserError

LOCK_NAME = "writer.lock"
LEASE_SECONDS = 120.0  # a holder on another host silent this long is taken for dead
RENEW_FRACTION = 4  # renew four times per lease: one missed renewal (a slow NFS) is harmless


def _holder_alive(holder: dict[str, Any], now: float) -> bool:
    if holder.get("host") == socket.gethostname():
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, another user's
            return True
        except (KeyError, TypeError, ValueError):
            return False
        return True
    lease = float(holder.get("lease_s", LEASE_SECONDS))
    return now - float(holder.get("renewed", 0.0)) < lease


def _read(path: Path) -> dict[str, Any] | None:
    try:
        holder = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a writer killed between create and fill: stale
    return holder if isinstance(holder, dict) else {}


class RunLock:
    """The writer lock of ``run_dir``; use as a context manager (``with RunLock(dir):``)."""

    def __init__(self, run_dir: str | Path, *, lease_s: float = LEASE_SECONDS,
                 warn: Callable[[str], None] = lambda m: None) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.lease_s = lease_s
        self.warn = warn
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.record: dict[str, Any] = {}

    def _content(self, started: float) -> bytes:
        self.record = {"pid": os.getpid(), "host": socket.gethostname(), "started": started,
                       "renewed": time.time(), "lease_s": self.lease_s}
        return json.dumps(self.record).encode()

    def _write_tmp(self, started: float) -> str:
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{LOCK_NAME}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            fh.write(self._content(started))
            fh.flush()
            os.fsync(fh.fileno())
        return tmp

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._write_tmp(time.time())
        try:
            while True:
                try:
                    os.link(tmp, self.path)  # fails if the lock exists: the exclusive create
                    break
                except FileExistsError:
                    pass
                holder = _read(self.path)
                if holder is None:
                    continue  # released between the link and the read: try again
                if _holder_alive(holder, time.time()):
                    raise UserError(
                        f"{self.path.parent} is in use by process {holder.get('pid')} on host "
                        f"{holder.get('host')} (lock {self.path}); wait for it to end, or stop it")
                self.warn(f"warning: taking over the lock of {self.path.parent} left by process "
                          f"{holder.get('pid')} on host {holder.get('host')}, which is gone")
                os.replace(tmp, self.path)
                tmp = ""
                break
        finally:
            if tmp:
                Path(tmp).unlink(missing_ok=True)
        self._thread = threading.Thread(target=self._renew, name="run-lock-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(self.lease_s / RENEW_FRACTION):
            if not self.owned():
                return
            try:
                os.replace(self._write_tmp(self.record["started"]), self.path)
            except OSError:  # a full disk or an NFS hiccup: retry at the next tick, lease permitting
                continue

    def owned(self) -> bool:
        holder = _read(self.path) or {}
        return holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.owned():
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
