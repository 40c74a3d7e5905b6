"""The run directory lock: one holder, its PID and host in the file, a stale lock taken over and said."""

from __future__ import annotations

import json
import os
import socket
import sys

import pytest

from fasttune.run_dir import RunDirError
from fasttune.run_lock import RunLock


@pytest.mark.posix("a real file lock (fcntl.flock)")
def test_one_holder_named_in_the_error(tmp_path):
    path = tmp_path / "run.lock"
    with RunLock(path, log=lambda s: None):
        owner = json.loads(path.read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunDirError, match=f"pid {os.getpid()} on host {socket.gethostname()}"):
            RunLock(path, log=lambda s: None).acquire()
    assert not path.exists()
    with RunLock(path, log=lambda s: None):  # released: free again
        pass


@pytest.mark.posix("a real file lock (fcntl.flock) to tell a dead holder from a live one")
def test_a_stale_lock_is_reported_and_taken_over(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 4242424, "host": "elsewhere", "started": 0}))
    said = []
    with RunLock(path, log=said.append) as lock:
        assert lock.stale.startswith("pid 4242424 on host elsewhere")
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(said) == 1 and "stale lock" in said[0] and "pid 4242424" in said[0]


def test_without_file_locks_a_second_run_is_warned_not_told_the_first_is_stale(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "fcntl", None)  # neither POSIX nor Windows locks: import fails
    monkeypatch.setitem(sys.modules, "msvcrt", None)
    path = tmp_path / "run.lock"
    said: list[str] = []
    with RunLock(path, log=said.append):
        with RunLock(path, log=said.append) as second:
            assert second.stale is None
            assert json.loads(path.read_text())["pid"] == os.getpid()
    assert not path.exists()
    assert len(said) == 3 and all("this platform has no file locks" in s for s in said[:2])
    assert f"it names pid {os.getpid()} on host {socket.gethostname()}" in said[2]
    assert "may still be running; this run writes here too" in said[2] and "stale" not in said[2]
