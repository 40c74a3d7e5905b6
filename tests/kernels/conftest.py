"""Kernel tests: Triton paths under TRITON_INTERPRET=1 on the CPU, compiled on CUDA when a GPU is present.

Triton decides interpreter-or-compiler when a kernel is decorated, i.e. when a kernel module is imported,
so the variable is set here, at conftest import, before any test module imports `fasttune.kernels.*`. Run
these tests in their own process (`pytest tests/kernels`); on a machine with CUDA and TRITON_INTERPRET unset,
the compiled GPU tests run instead of the interpreted CPU ones (`TRITON_INTERPRET=1` forces the latter).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

_KERNEL_MODULES = ["_dispatch", "rms_norm", "rope", "swiglu", "swiglu_lora", "rank_product", "lora", "nf4",
                   "cross_entropy", "fp8"]


def _redecorate_for_interpreter() -> None:
    """Re-execute kernel modules whose kernels were decorated for the compiler.

    That happens when another test directory in this process imported a kernel module while TRITON_INTERPRET
    was unset (or unset by a test's monkeypatch). Reloading keeps each module object, so functions and
    classes that tests imported earlier look up the re-decorated kernels at call time.
    """
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    stale = False
    for name in _KERNEL_MODULES:
        mod = sys.modules.get(f"fasttune.kernels.{name}")
        kernels = [] if mod is None else [v for k, v in vars(mod).items() if k.endswith("_kernel")
                                          or k == "to_dtype"]
        stale = stale or any(type(k).__name__ == "JITFunction" for k in kernels)
    if stale:
        for name in _KERNEL_MODULES:  # _dispatch first: the others import its helpers
            if f"fasttune.kernels.{name}" in sys.modules:
                importlib.reload(sys.modules[f"fasttune.kernels.{name}"])


_redecorate_for_interpreter()

from fasttune.kernels._dispatch import HAS_TRITON, interpreting  # noqa: E402


def _triton_decorated_for_compiler() -> bool:
    """Triton's own library (tl.sum, tl.sigmoid, ...) is decorated when triton is first imported; if that
    happened before TRITON_INTERPRET=1 was set, interpreted kernels cannot call it."""
    if not HAS_TRITON:
        return False
    import triton.language as tl

    return type(tl.sum).__name__ == "JITFunction"


@pytest.fixture(autouse=True)
def _interpreted_kernels(request: pytest.FixtureRequest):
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("device") == "cpu" and _triton_decorated_for_compiler():
        pytest.skip("triton was imported in this process before TRITON_INTERPRET=1 was set (by another "
                    "test directory); run `pytest tests/kernels` in its own process")
    _redecorate_for_interpreter()

_cpu_ok = HAS_TRITON and interpreting()
_cuda_ok = HAS_TRITON and torch.cuda.is_available() and not interpreting()

_DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not _cpu_ok, reason="needs triton with TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not _cuda_ok, reason="needs CUDA, triton, and TRITON_INTERPRET unset"),
    ]),
]


# For pure-torch ops (no Triton inside): the CPU always, CUDA where present.
_ANY_DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
]


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """`device`: once per device, Triton interpreted on the CPU and compiled on CUDA; `any_device`: the
    CPU always and CUDA where present, for ops without a Triton kernel."""
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", _DEVICES)
    if "any_device" in metafunc.fixturenames:
        metafunc.parametrize("any_device", _ANY_DEVICES)
