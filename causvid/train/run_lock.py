"""One run per output folder: an exclusive lock on ``<train.output_dir>/run.lock`` (docs/reliability.md).

The lock is ``fcntl.flock`` on that file, held (by the global rank 0 process) from before the
accelerator is built until the run ends. The kernel drops it when the process exits for any reason,
``kill -9`` and the OOM killer included, so a lock can never be stale: a lock *file* left behind is
only a record of the last holder and is taken over by the next run. The holder writes its pid, host
and start time into the file; a second run on the same folder reads them and fails at once with one
line naming the holder (:class:`RunLockError`; the training scripts print it and exit 2).

Needs a file system with working ``flock`` (local disks; Linux NFS emulates it with POSIX locks).
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Optional

__all__ = ["LOCK_NAME", "RunLock", "RunLockError", "read_holder"]

LOCK_NAME = "run.lock"


class RunLockError(RuntimeError):
    """The output folder is locked by another run. The message names the holder."""


def read_holder(path: str) -> Optional[dict]:
    """What the holder wrote into the lock file (pid, host, start time), or None if unreadable."""
    try:
        with open(path) as f:
            holder = json.loads(f.read() or "null")
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


class RunLock:
    """``with RunLock(folder): ...`` or ``lock.acquire()`` / ``lock.release()``; not reentrant."""

    def __init__(self, folder: str):
        self.folder = folder
        self.path = os.path.join(folder, LOCK_NAME)
        self._fd: Optional[int] = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        import fcntl

        if self._fd is not None:
            return self
        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise RunLockError(f"train.output_dir {self.folder} exists and is not a folder")
        try:
            os.makedirs(self.folder, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # read-only, permission, a missing parent the kernel refuses to create
            raise RunLockError(f"train.output_dir {self.folder}: cannot create {LOCK_NAME} there "
                               f"({err.strerror or err})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = read_holder(self.path) or {}
            who = (f"pid {h.get('pid', '?')} on host {h.get('host', '?')}, started {h.get('started', '?')}"
                   if h else "holder unknown")
            raise RunLockError(f"train.output_dir {self.folder} is in use by another run ({who}); wait for it to "
                               f"end or choose another train.output_dir") from None
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays: deleting it could let two runs lock different files)."""
        if self._fd is None:
            return
        import fcntl

        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
