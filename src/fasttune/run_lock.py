"""One writer per run directory: a lock file holding the writer's PID and host, held with flock.

The kernel drops a flock when its process dies (kill -9 included), so a lock file whose flock is free
is stale: the run that wrote it ended without removing it. Taking the lock then says whose it was. A lock
held by a live process is an error that names the process and host. Over NFS, where flock may not reach
other hosts, the PID and host in the file are what a user reads to decide.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path

from fasttune.run_dir import RunDirError


def _describe(owner: dict) -> str:
    started = owner.get("started")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, int | float) \
        else "an unknown time"
    return f"pid {owner.get('pid', '?')} on host {owner.get('host', '?')} (since {when})"


class RunLock:
    """`with RunLock(path, log):` holds the lock for the block; `stale` is set to the previous owner's
    description when a dead run's lock was taken over."""

    def __init__(self, path: str | Path, log=print):
        self.path = Path(path)
        self.log = log
        self.stale: str | None = None
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        for _ in range(10):  # another process may unlink the file between our open and our flock
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read(fd)
                os.close(fd)
                raise RunDirError(f"{self.path.parent}: another fasttune run is writing here: "
                                  f"{_describe(owner)} holds {self.path}") from None
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:
                os.close(fd)
                continue
            previous = _read(fd)
            if previous:
                self.stale = _describe(previous)
                self.log(f"  {self.path}: a stale lock of a run that ended without releasing it "
                         f"({self.stale}); taking it over")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": int(time.time())}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
            os.fsync(fd)
            self._fd = fd
            return self
        raise RunDirError(f"{self.path}: could not take the lock (it kept being replaced)")

    def release(self) -> None:
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        owner = json.loads(data.decode() or "{}")
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}
    return owner if isinstance(owner, dict) else {"pid": "?", "host": "?"}
