"""One writer per run directory: a lock file holding the writer's PID and host, held with flock.

The kernel drops a flock when its process dies (kill -9 included), so a lock file whose flock is free
is stale: the run that wrote it ended without removing it. Taking the lock then says whose it was. A lock
held by a live process is an error that names the process and host. Over NFS, where flock may not reach
other hosts, the PID and host in the file are what a user reads to decide.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from fasttune.run_dir import RunDirError


def _try_lock(fd: int) -> bool | None:
    """Take an exclusive lock on fd without waiting: True taken, False held by another process, None where
    the platform has neither flock (POSIX) nor msvcrt.locking (Windows), or the filesystem has no locks."""
    try:
        import fcntl
    except ImportError:
        fcntl = None
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as e:  # a filesystem without locks (some network and FUSE mounts)
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return None
            raise
        return True
    try:
        import msvcrt
    except ImportError:
        return None
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    return True


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
            locked = _try_lock(fd)
            if locked is None:
                self.log(f"  {self.path}: this platform has no file locks; the lock file names this run "
                         "but does not stop another from writing here")
            if locked is False:
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
            if previous and locked is None:  # without locks, nothing tells whether that run still lives
                self.log(f"  {self.path}: it names {_describe(previous)}, which may still be running; "
                         "this run writes here too")
            elif previous:
                self.stale = _describe(previous)
                self.log(f"  {self.path}: a stale lock of a run that ended without releasing it "
                         f"({self.stale}); taking it over")
            me = {"pid": os.getpid(), "host": socket.gethostname(), "started": int(time.time())}
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, (json.dumps(me) + "\n").encode())
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
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
        owner = json.loads(data.decode() or "{}")
    except (OSError, ValueError):
        return {"pid": "?", "host": "?"}
    return owner if isinstance(owner, dict) else {"pid": "?", "host": "?"}
