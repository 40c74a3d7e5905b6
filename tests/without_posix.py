"""`pytest -p without_posix` (with tests/ on PYTHONPATH): the whole pytest process runs without the POSIX-only
modules `resource` and `fcntl` and without `os.sysconf`, as on Windows, from before fasttune is first
imported. What fails in that pass is fasttune's own code assuming Linux.

The libraries the tests and fasttune load import these modules at load on Linux (and not on Windows, where
they take other paths): they are loaded first, then the masks go on, as tests/test_platforms.py does for one
training run. Python processes that a test starts (CLI runs, torchrun, forkserver) are not masked.

A test that needs what the masks take away (a real file lock, resource limits) says so with
`@pytest.mark.posix("what it needs")`; this pass skips it with that reason.
"""

from __future__ import annotations

# Standard-library modules that import fcntl on Linux (subprocess and what spawns processes), then the
# third-party libraries that import fcntl or resource at load (torch, transformers: fcntl; peft, datasets:
# resource too, through psutil).
import concurrent.futures.process  # noqa: F401
import multiprocessing.connection  # noqa: F401
import os
import pty  # noqa: F401
import subprocess  # noqa: F401
import sys

import datasets  # noqa: F401
import peft  # noqa: F401
import pytest
import safetensors.torch  # noqa: F401
import torch  # noqa: F401
import transformers  # noqa: F401

MASKED = ("resource", "fcntl", "msvcrt")  # msvcrt: absent on Linux anyway; Windows' locks are not tested here

for _name in MASKED:
    sys.modules[_name] = None  # `import resource` now raises ImportError
del os.sysconf


def pytest_report_header(config: pytest.Config) -> str:
    return "without_posix: resource, fcntl and os.sysconf are unavailable in this process (as on Windows)"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        marker = item.get_closest_marker("posix")
        if marker is not None:
            what = marker.args[0] if marker.args else "resource, fcntl or os.sysconf"
            item.add_marker(pytest.mark.skip(reason=f"needs {what}: this pass runs without the POSIX-only "
                                                    "modules"))
