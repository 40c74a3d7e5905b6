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

# A kernel module imported earlier in this process (by another test directory) was decorated for the compiler;
# re-executing it decorates its kernels for the interpreter.
_KERNEL_MODULES = ["_dispatch", "rms_norm", "rope", "swiglu", "lora", "nf4", "cross_entropy"]
for _name in _KERNEL_MODULES:
    _mod = sys.modules.get(f"fasttune.kernels.{_name}")
    if _mod is not None and os.environ.get("TRITON_INTERPRET") == "1":
        importlib.reload(_mod)

from fasttune.kernels._dispatch import HAS_TRITON, interpreting  # noqa: E402

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
