"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32, output in the promoted dtype of x and w.

Forward, per row x (D,), in fp32:
    rstd = 1 / sqrt(mean(x^2) + eps)          (saved, one fp32 per row)
    n    = x * rstd                           (rounded to x's dtype, as transformers' LlamaRMSNorm does)
    y    = w * n
Backward, with dy and the rounding of n treated as identity:
    dn = dy * w
    dx = rstd * (dn - n * mean(dn * n))       (n recomputed in fp32 from the saved x and rstd)
    dw = sum over rows of dy * round(n)       (per-program fp32 partial sums, reduced by torch after)
Programs work on (rows, D) tiles of about 4096 elements: one row of a 4096-wide hidden state, or 32 rows of
a head_dim-128 q/k norm.

Input-gradient addend (`grad_addend`): in a pre-norm residual block x + f(norm(x)) the gradient of x is
g + d norm(x)/dx, for the block's upstream gradient g. A recompute that knows g before it runs the branch
(`memory.layer_pass.LayerPass`) hands it to the norm, whose backward kernel adds it to dx in the same write,
instead of a separate pass that reads both and writes the sum (dx = rstd (dn - n mean(dn n)) + g).
"""

from __future__ import annotations

import torch

from fasttune.kernels._dispatch import cdiv, jit, next_pow2, row_block, tl, to_dtype, use_triton


@jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, n_rows, n_cols, eps,
    ROWS: tl.constexpr, BLOCK: tl.constexpr,
):
    # A (ROWS, BLOCK) tile: several short rows per program (head_dim-sized q/k norms), one long row otherwise.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    mask = (rows < n_rows)[:, None] & cmask[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)  # (ROWS,)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)
    n = to_dtype(xf * rstd[:, None], x.dtype).to(tl.float32)  # the reference's rounding point
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    y = to_dtype(w[None, :] * n, y_ptr.dtype.element_ty)
    tl.store(y_ptr + rows[:, None] * stride_y + cols[None, :], y, mask=mask)


@jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr, add_ptr,
    stride_dy, stride_x, stride_dx, stride_add, n_rows, n_cols, tiles_per_program,
    ROWS: tl.constexpr, BLOCK: tl.constexpr, HAS_ADD: tl.constexpr,
):
    # Each program walks a contiguous range of (ROWS, BLOCK) tiles and keeps its share of dw in registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    cmask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=cmask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    # 64-bit row offsets: N * D can pass 2^31.
    rows = pid.to(tl.int64) * tiles_per_program * ROWS + tl.arange(0, ROWS)
    for _ in range(0, tiles_per_program):
        rmask = rows < n_rows
        mask = rmask[:, None] & cmask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0)
        xf = x.to(tl.float32)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=rmask, other=0.0)[:, None]  # (ROWS, 1)
        n = xf * rstd
        dw_acc += tl.sum(dy * to_dtype(n, x.dtype).to(tl.float32), axis=0)
        dn = dy * w[None, :]
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=1) / n_cols)[:, None])
        if HAS_ADD:  # the residual branch's gradient, added before the one rounding
            dx += tl.load(add_ptr + rows[:, None] * stride_add + cols[None, :], mask=mask, other=0.0).to(
                tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_dx + cols[None, :], to_dtype(dx, dx_ptr.dtype.element_ty),
                 mask=mask)
        rows += ROWS
    tl.store(dw_part_ptr + pid * n_cols + cols, dw_acc, mask=cmask)


def _tile(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(ROWS, BLOCK, num_warps): rows per tile so that a tile holds about 4096 elements, at least one row."""
    block, num_warps = row_block(n_cols)
    rows = max(1, min(64, 4096 // block, next_pow2(max(n_rows, 1))))
    return rows, block, num_warps


def _rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    rows, block, num_warps = _tile(n_rows, n_cols)
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows:
        _rms_norm_fwd_kernel[(cdiv(n_rows, rows),)](
            x2, weight, y, rstd, x2.stride(0), y.stride(0), n_rows, n_cols, eps,
            ROWS=rows, BLOCK=block, num_warps=num_warps)
    return y, rstd


def _programs(n_tiles: int, device: torch.device) -> int:
    """Programs for a tile-looping backward: a few per SM on a GPU, few in the (slow) interpreter."""
    if device.type == "cuda":
        return max(1, min(n_tiles, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_tiles, 4))


def _rms_norm_bwd(dy2, x2, weight, rstd, add2=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx, dw); `add2` (N, D), if given, is added to dx in the kernel (module docstring)."""
    n_rows, n_cols = x2.shape
    rows, block, num_warps = _tile(n_rows, n_cols)
    n_tiles = cdiv(n_rows, rows)
    programs = _programs(n_tiles, x2.device)
    dx = torch.empty_like(x2)
    dw_part = torch.zeros((programs, n_cols), dtype=torch.float32, device=x2.device)
    if n_rows:
        add = dx if add2 is None else add2  # unread without HAS_ADD
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd, dx, dw_part, add, dy2.stride(0), x2.stride(0), dx.stride(0), add.stride(0),
            n_rows, n_cols, cdiv(n_tiles, programs), ROWS=rows, BLOCK=block, HAS_ADD=add2 is not None,
            num_warps=num_warps)
    return dx, dw_part.sum(0).to(weight.dtype)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as (N, D) rows with a unit column stride (a copy only when it has none)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float, addend: torch.Tensor | None = None):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (N, D)
        y, rstd = _rms_norm_fwd(x2, weight.contiguous(), eps)
        ctx.save_for_backward(x2, weight, rstd, addend)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd, addend = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # (N, D)
        add2 = None if addend is None else _rows(addend.to(x2.dtype))
        dx, dw = _rms_norm_bwd(dy2, x2, weight.contiguous(), rstd, add2)
        return dx.view(dy.shape), (dw if ctx.needs_input_grad[1] else None), None, None


class _AddToGrad(torch.autograd.Function):
    """Identity forward; the backward adds `addend` to the gradient (the torch path of the addend)."""

    @staticmethod
    def forward(ctx, x, addend):
        ctx.save_for_backward(addend)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, dy):
        (addend,) = ctx.saved_tensors
        return dy + addend, None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, force_triton: bool | None = None,
    grad_addend: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over the last dimension: Triton on CUDA, the reference elsewhere (`_dispatch.use_triton`).
    `grad_addend` (x's shape): added to x's gradient in the backward (module docstring)."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x has last dimension {x.shape[-1]} but weight has {weight.shape[-1]}")
    if grad_addend is not None and grad_addend.shape != x.shape:
        raise ValueError(f"rms_norm: grad_addend {tuple(grad_addend.shape)} is not shaped like x "
                         f"{tuple(x.shape)}")
    addend = grad_addend
    if use_triton(x, weight, force=force_triton):
        return RMSNormFunction.apply(x, weight, eps, addend)
    if addend is not None:
        x = _AddToGrad.apply(x, addend)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same rounding points as transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
