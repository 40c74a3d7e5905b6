"""Every test run gets its own fasttune cache (FASTTUNE_CACHE, read by `models.loading.cache_root`).

The tests never read or write the user's ~/.cache/fasttune: a conversion there could be cold, stale or
made by another environment, so a test's output would depend on the machine. The folder is made when
pytest loads this file, before any test imports fasttune; subprocesses (the CLI tests) and pytest-xdist
workers inherit it through the environment, and the process that made it removes it at the end.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

_OWN_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ:  # an xdist worker uses its controller's folder
    _OWN_CACHE = tempfile.mkdtemp(prefix="fasttune-test-cache-")
    os.environ["FASTTUNE_CACHE"] = _OWN_CACHE


def pytest_unconfigure(config) -> None:
    if _OWN_CACHE is not None:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """A finished 2-step run of a tiny random Llama (tests/tiny_run.py), shared by the tests of what is made
    from a run directory (model cards, Hub uploads)."""
    from tiny_run import make_tiny_run

    return make_tiny_run(tmp_path_factory.mktemp("tiny-run"))
