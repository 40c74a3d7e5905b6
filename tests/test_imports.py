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


def test_every_public_name_resolves():
    """`from fasttune import X` works for each name in `__all__` (lazily imported), transformers' collators
    and streamers among them as the classes themselves."""
    import transformers

    for name in fasttune.__all__:
        assert getattr(fasttune, name) is not None, name
    assert fasttune.DataCollatorForSeq2Seq is transformers.DataCollatorForSeq2Seq
    assert fasttune.TextStreamer is transformers.TextStreamer
