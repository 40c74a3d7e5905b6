"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32, output in the promoted dtype of x and w.

Forward, per row x (D,), in fp32:
    rstd = 1 / sqrt(mean(x^2) + eps)          (saved, one fp32 per row)
    n    = x * rstd                           (rounded to x's dtype, as transformers' LlamaRMSNorm does)
    y    = w * n
Backward, with dy and the rounding of n treated as identity:
    dn = dy * w
    dx = rstd * (dn - n * mean(dn * n))       (n recomputed in fp32 from the saved x and rstd)
    dw = sum over rows of dy * round(n)       (per-program fp32 partial sums, reduced by torch after)
"""

from __future__ import annotations

import torch

from fasttune.kernels._dispatch import jit, row_block, tl, to_dtype, use_triton


@jit
def _rms_norm_fwd_kernel(
    x_ptr, w_ptr, y_ptr, rstd_ptr, stride_x, stride_y, n_cols, eps, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    tl.store(rstd_ptr + row, rstd)
    n = to_dtype(xf * rstd, x.dtype).to(tl.float32)  # the reference's rounding point
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, to_dtype(w * n, y_ptr.dtype.element_ty), mask=mask)


@jit
def _rms_norm_bwd_kernel(
    dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_part_ptr,
    stride_dy, stride_x, stride_dx, n_rows, n_cols, rows_per_program,
    BLOCK: tl.constexpr,
):
    # Each program walks a contiguous range of rows and keeps its share of dw in registers.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((BLOCK,), dtype=tl.float32)
    start = pid * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    # Row pointers advance by their strides (64-bit offsets: N * D can pass 2^31).
    x_ptr += start.to(tl.int64) * stride_x
    dy_ptr += start.to(tl.int64) * stride_dy
    dx_ptr += start.to(tl.int64) * stride_dx
    for r in range(start, end):
        x = tl.load(x_ptr + cols, mask=mask, other=0.0)
        xf = x.to(tl.float32)
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + r)
        n = xf * rstd
        dw_acc += dy * to_dtype(n, x.dtype).to(tl.float32)
        dn = dy * w
        dx = rstd * (dn - n * (tl.sum(dn * n, axis=0) / n_cols))
        tl.store(dx_ptr + cols, to_dtype(dx, dx_ptr.dtype.element_ty), mask=mask)
        x_ptr += stride_x
        dy_ptr += stride_dy
        dx_ptr += stride_dx
    tl.store(dw_part_ptr + pid * n_cols + cols, dw_acc, mask=mask)


def _rms_norm_fwd(x2: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    block, num_warps = row_block(n_cols)
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(x2.dtype, weight.dtype), device=x2.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x2.device)
    if n_rows:
        _rms_norm_fwd_kernel[(n_rows,)](
            x2, weight, y, rstd, x2.stride(0), y.stride(0), n_cols, eps, BLOCK=block, num_warps=num_warps)
    return y, rstd


def _programs(n_rows: int, device: torch.device) -> int:
    """Programs for a row-looping backward: a few per SM on a GPU, few in the (slow) interpreter."""
    if device.type == "cuda":
        return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))
    return max(1, min(n_rows, 4))


def _rms_norm_bwd(dy2, x2, weight, rstd) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    block, num_warps = row_block(n_cols)
    programs = _programs(n_rows, x2.device)
    rows_per_program = -(-n_rows // programs) if n_rows else 1
    dx = torch.empty_like(x2)
    dw_part = torch.zeros((programs, n_cols), dtype=torch.float32, device=x2.device)
    if n_rows:
        _rms_norm_bwd_kernel[(programs,)](
            dy2, x2, weight, rstd, dx, dw_part, dy2.stride(0), x2.stride(0), dx.stride(0),
            n_rows, n_cols, rows_per_program, BLOCK=block, num_warps=num_warps)
    return dx, dw_part.sum(0).to(weight.dtype)


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()  # (N, D)
        y, rstd = _rms_norm_fwd(x2, weight.contiguous(), eps)
        ctx.save_for_backward(x2, weight, rstd)
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1]).contiguous()  # (N, D)
        dx, dw = _rms_norm_bwd(dy2, x2, weight.contiguous(), rstd)
        return dx.view(dy.shape), (dw if ctx.needs_input_grad[1] else None), None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, force_triton: bool | None = None
) -> torch.Tensor:
    """RMSNorm over the last dimension: Triton on CUDA, the reference elsewhere (`_dispatch.use_triton`)."""
    if x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"rms_norm: x has last dimension {x.shape[-1]} but weight has {weight.shape[-1]}")
    if use_triton(x, weight, force=force_triton):
        return RMSNormFunction.apply(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same rounding points as transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
