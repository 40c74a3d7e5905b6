"""SwiGLU activation of the Llama MLP: h = silu(gate) * up, elementwise.

Forward, with sigma = sigmoid(g), in fp32 and rounded once to the output dtype:
    h = g * sigma * u
Backward, for upstream dh, recomputing sigma from the saved g (only g and u are saved, never silu(g)):
    du = dh * g * sigma
    dg = dh * u * sigma * (1 + g * (1 - sigma))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.kernels._dispatch import cdiv, jit, tl, to_dtype, use_triton

_BLOCK = 1024


@jit
def _swiglu_fwd_kernel(g_ptr, u_ptr, h_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + offs, to_dtype(h, h_ptr.dtype.element_ty), mask=mask)


@jit
def _swiglu_bwd_kernel(dh_ptr, g_ptr, u_ptr, dg_ptr, du_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(dh_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    tl.store(du_ptr + offs, to_dtype(dh * silu, du_ptr.dtype.element_ty), mask=mask)
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(dg_ptr + offs, to_dtype(dg, dg_ptr.dtype.element_ty), mask=mask)


def _swiglu_fwd(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    h = torch.empty_like(gate, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(cdiv(n, _BLOCK),)](gate, up, h, n, BLOCK=_BLOCK)
    return h


def _swiglu_bwd(dh, gate, up, inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(dg, du); `inplace` writes them over gate and up (each element is read before it is written)."""
    if inplace:
        dg, du = gate, up
    else:
        dg = torch.empty_like(gate, memory_format=torch.contiguous_format)
        du = torch.empty_like(up, memory_format=torch.contiguous_format)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(cdiv(n, _BLOCK),)](dh, gate, up, dg, du, n, BLOCK=_BLOCK)
    return dg, du


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate, up = gate.contiguous(), up.contiguous()  # the kernels index flat memory
        ctx.save_for_backward(gate, up)
        return _swiglu_fwd(gate, up)

    @staticmethod
    def backward(ctx, dh: torch.Tensor):
        gate, up = ctx.saved_tensors
        return _swiglu_bwd(dh.contiguous(), gate, up)


def swiglu(gate: torch.Tensor, up: torch.Tensor, force_triton: bool | None = None) -> torch.Tensor:
    """silu(gate) * up for two tensors of one shape and dtype. Triton on CUDA, the reference elsewhere."""
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} "
                         "must have the same shape and dtype")
    if use_triton(gate, up, force=force_triton):
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
