"""One run per workdir: ``<workdir>/LOCK``, held with ``flock`` for the life of the run.

Two copies of a run on one workdir (a requeued job whose first copy still runs)
would overwrite each other's checkpoints and interleave their metrics. The lock
file records its holder (host, pid, start time) for the error message. The
kernel releases an ``flock`` when its holder dies, however it dies, so a lock
left by a killed run is free and is taken over with a note; a clean exit
empties the file. In a multi-process run, process 0 holds it for all.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from alexnet_jax.errors import WorkdirBusy


class WorkdirLock:
    def __init__(self, workdir: str | os.PathLike):
        self.path = Path(workdir) / "LOCK"
        self._fd: int | None = None
        self.stale: dict | None = None  # the dead holder whose lock was taken over, if any

    def acquire(self) -> WorkdirLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read(fd)
            os.close(fd)
            raise WorkdirBusy(
                f"Another run is using --workdir={self.path.parent}: {describe_holder(holder)}. Two runs on one "
                "workdir would overwrite each other's checkpoints. Wait for it to end or stop it, or give "
                "another --workdir."
            ) from None
        self.stale = _read(fd) or None  # the kernel freed it: its holder is gone
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # an empty file: free, and nobody to report as stale
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def describe_holder(holder: dict | None) -> str:
    """The run a lock file names, for a message: its pid, host and start time."""
    if not holder:
        return "a run that has not written its name yet"
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('started')}"


def _read(fd: int) -> dict:
    raw = os.pread(fd, 4096, 0)
    try:
        return json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {"unreadable": raw[:80].decode(errors="replace")}
