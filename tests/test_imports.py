"""Every module of fasttune imports. In the without_posix pass (scripts/test.sh) this is the check that no
module reaches for resource, fcntl or os.sysconf at import, whichever package it is in."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import fasttune

# __main__ runs the CLI when imported; fasttune.cli, which it calls, is imported here on its own
MODULES = sorted(m.name for m in pkgutil.walk_packages(fasttune.__path__, "fasttune.")
                 if m.name != "fasttune.__main__")


def test_every_package_is_walked():
    packages = {name.split(".")[1] for name in MODULES}
    assert {"cli", "data", "export", "infer", "kernels", "lora", "memory", "models", "notebook", "serve",
            "train", "api", "run_lock"} <= packages


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    importlib.import_module(name)
