"""The run directory lock: one holder, its PID and host in the file, a stale lock taken over and said."""

from __future__ import annotations

import json
import os
import socket

import pytest

from fasttune.run_dir import RunDirError
from fasttune.run_lock import RunLock


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


def test_a_stale_lock_is_reported_and_taken_over(tmp_path):
    path = tmp_path / "run.lock"
    path.write_text(json.dumps({"pid": 4242424, "host": "elsewhere", "started": 0}))
    said = []
    with RunLock(path, log=said.append) as lock:
        assert lock.stale.startswith("pid 4242424 on host elsewhere")
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert len(said) == 1 and "stale lock" in said[0] and "pid 4242424" in said[0]
