"""Products of a rank-r factor pair that write a large output: out = c + a b, one pass over the output.

For a (N, r), b (r, M) with r small (a LoRA rank, or a few ranks side by side) and c (N, M) or none, in fp32
on the tensor cores and rounded once to the output dtype:
    out = c + a b
Backward (the autograd function, for standalone use; `kernels/lora.py` calls the launcher inside its own
hand-written passes):
    dc = dout,  da = dout b^T (N, r),  db = a^T dout (r, M)

Why a kernel: the LoRA layers write x A^T (s B^T) into an (N, out) buffer that the base product then
accumulates onto, and a recomputed layer's forward also adds the residual there. At a rank-r inner dimension
cuBLAS runs these far below the memory bandwidth, and addmm first copies c into the output; the kernel's
traffic is one write of out (and one read of c).
"""

from __future__ import annotations

import torch

from fasttune.kernels._dispatch import cdiv, interpreting, jit, next_pow2, tl, to_dtype, use_triton

_BLOCK_N, _BLOCK_M = 64, 128  # rows x columns per program; each program reads a (64, r) and an (r, 128) slice


@jit
def _rank_product_fwd_kernel(a_ptr, b_ptr, c_ptr, out_ptr, n_rows, n_cols, rank, s_an, s_ar, s_br, s_bm,
                             s_cn, s_on, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_R: tl.constexpr, HAS_C: tl.constexpr, DOT_FP32: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r = tl.arange(0, BLOCK_R)
    row_ok, col_ok, r_ok = rows < n_rows, cols < n_cols, r < rank
    a = tl.load(a_ptr + rows[:, None] * s_an + r[None, :] * s_ar, mask=row_ok[:, None] & r_ok[None, :],
                other=0.0)  # (BLOCK_N, BLOCK_R)
    b = tl.load(b_ptr + r[:, None] * s_br + cols[None, :] * s_bm, mask=r_ok[:, None] & col_ok[None, :],
                other=0.0)  # (BLOCK_R, BLOCK_M)
    # fp32 operands kept whole ('ieee') for fp32 inputs and in the interpreter (its bf16 dot is wrong)
    if DOT_FP32:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(a, b)
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_C:
        acc += tl.load(c_ptr + rows[:, None] * s_cn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * s_on + cols[None, :], to_dtype(acc, out_ptr.dtype.element_ty),
             mask=mask)


def _check(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None, out: torch.Tensor | None) -> None:
    ok = a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[0] and a.dtype == b.dtype
    shape = (a.shape[0], b.shape[1]) if ok else None
    for t in (c, out):
        ok = ok and (t is None or (t.shape == shape and t.dtype == a.dtype and t.stride(1) == 1))
    if not ok:
        raise ValueError(f"rank_product: a {tuple(a.shape)} {a.dtype}, b {tuple(b.shape)} {b.dtype}, c "
                         f"{None if c is None else (tuple(c.shape), c.dtype)}, out "
                         f"{None if out is None else (tuple(out.shape), out.dtype)} do not fit "
                         "(N, r) x (r, M) + (N, M) in one dtype, with unit column strides for c and out")


def _rank_product_fwd(a, b, c=None, out=None) -> torch.Tensor:
    """c + a b into `out` (a new tensor when None; it may be c itself)."""
    _check(a, b, c, out)
    n, m = a.shape[0], b.shape[1]
    if out is None:
        out = torch.empty((n, m), dtype=a.dtype, device=a.device)
    if out.numel():
        grid = (cdiv(n, _BLOCK_N), cdiv(m, _BLOCK_M))
        _rank_product_fwd_kernel[grid](
            a, b, out if c is None else c, out, n, m, a.shape[1], *a.stride(), *b.stride(),
            out.stride(0) if c is None else c.stride(0), out.stride(0), BLOCK_N=_BLOCK_N, BLOCK_M=_BLOCK_M,
            BLOCK_R=max(16, next_pow2(a.shape[1])), HAS_C=c is not None,
            DOT_FP32=a.dtype == torch.float32 or interpreting(), num_warps=4)
    return out


class RankProductFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, c):
        ctx.save_for_backward(a, b)
        ctx.has_c = c is not None
        return _rank_product_fwd(a, b, c)

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.saved_tensors
        da = dout @ b.t() if ctx.needs_input_grad[0] else None  # (N, r)
        db = a.t() @ dout if ctx.needs_input_grad[1] else None  # (r, M)
        return da, db, dout if ctx.has_c and ctx.needs_input_grad[2] else None


def rank_product(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor | None = None,
                 force_triton: bool | None = None) -> torch.Tensor:
    """c + a b for a (N, r), b (r, M), c (N, M) or None, in one dtype; Triton on CUDA, the reference
    elsewhere."""
    _check(a, b, c, None)
    if use_triton(a, b, c, force=force_triton):
        return RankProductFunction.apply(a, b, c)
    return rank_product_reference(a, b, c)


def rank_product_reference(a, b, c=None) -> torch.Tensor:
    return torch.mm(a, b) if c is None else torch.addmm(c, a, b)
