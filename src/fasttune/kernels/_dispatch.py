"""Which path a kernel op takes (Triton or the PyTorch reference), and the Triton import every kernel shares.

Rule: the Triton path runs when every tensor is on CUDA and `triton` imports; otherwise the reference runs.
Tests force the Triton path on CPU tensors (`force_triton=True`) under `TRITON_INTERPRET=1`, which Triton
reads when a kernel is decorated, i.e. when the kernel module is first imported. A test of a whole model
can send every op on CPU tensors to the interpreted kernels by also setting FASTTUNE_TRITON_ON_CPU=1.
"""

from __future__ import annotations

import os

import torch

try:  # triton is optional (the `gpu`/`test` extras); kernel modules import without it
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - exercised only on installs without triton
    triton = None
    tl = None
    HAS_TRITON = False


def jit(fn):
    """`triton.jit` where triton is installed; without it the kernel stays a plain (unlaunched) function."""
    return triton.jit(fn) if HAS_TRITON else fn


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return HAS_TRITON and os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def use_triton(*tensors: torch.Tensor | None, force: bool | None = None) -> bool:
    """Whether an op on `tensors` takes its Triton path.

    force=None decides by the rule above; force=True demands the Triton path (an error if triton is missing,
    or if the tensors are on the CPU while Triton is not interpreting); force=False picks the reference.
    """
    if force is False:
        return False
    on_cuda = True
    for t in tensors:  # a loop, not all(<generator>): this runs for every kernel call
        if t is not None and not t.is_cuda:
            on_cuda = False
            break
    if force is None:
        if not HAS_TRITON:
            return False
        if on_cuda:
            return True
        on_cpu = all(t is None or t.device.type == "cpu" for t in tensors)
        return on_cpu and interpreting() and os.environ.get("FASTTUNE_TRITON_ON_CPU", "0") == "1"
    if not HAS_TRITON:
        raise RuntimeError("fasttune.kernels: force_triton=True but triton is not installed")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            "fasttune.kernels: force_triton=True on CPU tensors needs TRITON_INTERPRET=1 set before the "
            "kernel modules are imported (tests/kernels/conftest.py sets it; run those tests in their own "
            "process)")
    return True


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for a launch grid."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (Triton block sizes must be powers of two)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def row_block(n_cols: int, max_block: int = 65536) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that holds one row of `n_cols` elements in registers."""
    block = next_pow2(n_cols)
    if block > max_block:
        raise ValueError(f"fasttune.kernels: a row of {n_cols} elements exceeds the limit of {max_block}")
    num_warps = 4 if block < 2048 else 8 if block < 8192 else 16 if block < 32768 else 32
    return block, num_warps


@jit
def to_dtype(x, dtype: tl.constexpr):
    """Round fp32 `x` to `dtype` to nearest-even.

    bf16 goes through integer ops because Triton's interpreter truncates fp32 -> bf16 casts (the GPU rounds
    to nearest-even); doing it by hand gives the interpreted tests and the GPU the same bits, at a few
    integer ops per element in kernels bound by memory traffic.
    """
    if dtype == tl.bfloat16:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        return b.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)
