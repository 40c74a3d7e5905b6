"""FP8 (e4m3) products for a frozen base weight with per-row scales: the forward's y = x W^T and the
backward's input gradient dx = dy W.

    weight  W (out, in) -> W8 (out, in) e4m3 and sw (out, 1) fp32, W ~ sw * W8 (once, at load)
    input   x (N, in)   -> x8 (N, in) e4m3 and sx (N, 1) fp32, x ~ sx * x8 (each product; one Triton pass:
                           row max, scale to the e4m3 range, cast)
    product y = sx * (x8 W8^T) * sw^T in bf16 (`torch._scaled_mm` with row-wise scales: FP8 tensor cores)
    grad    dx = dy W = (dy diag(sw)) W8. sw scales the rows of W, the contraction dimension of dy W, so it
            cannot scale the output; it is folded into dy's columns in the pass that quantises dy per row:
            dy diag(sw) -> d8 (N, out) e4m3 and sd (N, 1), and dx = sd * (d8 W8) in bf16.
Scales: s = max|row| / 448 (e4m3's largest finite value), so a row's largest element maps to 448; a zero
row gets s = 1e-12 / 448 and stays zero.

The backward's choices:
- Fold sw into dy rather than keep a second copy of W quantised per input column: the fold costs no memory
  and no pass (sw is read beside dy in the quantisation dy needs anyway) and multiplies by the forward's own
  W8; a second copy would add a byte per base parameter (7 GB at Llama-3.1-8B, more than half of that run's
  peak) and round W once more.
- `torch._scaled_mm` takes its second operand column-major, which for d8 W8 is W8^T contiguous (in, out):
  each product first transposes W8 into one FP8 buffer per device (`transpose_fp8`: a tiled Triton kernel,
  the buffer as large as the largest weight). That is a read and a write of a byte per weight element, less
  than the bf16 dequantisation it replaces (a byte read, two written, and two read again by the bf16
  product).
- dy in e4m3, not e5m2: peers that cast gradients to e5m2 (Transformer Engine's hybrid format, torchao's
  tensor-wise recipe) do so because one scale per tensor must cover the gradient's range across all rows.
  With a scale per row (as torchao's row-wise recipe, which casts gradients to e4m3 too), each row's largest
  element maps to 448, e4m3's normal range (448 down to 2^-6, a factor of 2^15) covers what counts in the
  row's dot products, and e4m3 keeps 3 mantissa bits to e5m2's 2.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fasttune.kernels._dispatch import cdiv, jit, row_block, tl, use_triton
from fasttune.kernels.scratch import Scratch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0
TINY = 1e-12  # the smallest row max: a zero row keeps a finite scale


class FP8Weight(NamedTuple):
    """A frozen weight in FP8: data (out, in) e4m3, scale (out, 1) fp32; W ~ scale * data."""

    data: torch.Tensor
    scale: torch.Tensor


@torch.no_grad()
def quantize_weight_fp8(w: torch.Tensor) -> FP8Weight:
    """Per-output-row e4m3 quantisation of a (out, in) weight (any float dtype, any device)."""
    if w.dim() != 2:
        raise ValueError(f"quantize_weight_fp8: expected a (out, in) weight, got shape {tuple(w.shape)}")
    data, scale = quantize_rows_reference(w)
    return FP8Weight(data, scale)


_buffers = Scratch()


@torch.no_grad()
def dequantize_fp8(w: FP8Weight, dtype: torch.dtype = torch.bfloat16, reuse_buffer: bool = False
                   ) -> torch.Tensor:
    """scale * data in `dtype`; with `reuse_buffer`, written into one buffer per device and dtype (the
    largest weight so far), which the next call overwrites: the caller uses it before dequantising again."""
    out_shape = tuple(w.data.shape)
    if not reuse_buffer:
        return (w.data.to(torch.float32) * w.scale).to(dtype)
    n = w.data.numel()
    out = _buffers.get((w.data.device, dtype), n, dtype, w.data.device).view(out_shape)
    out.copy_(w.data)  # exact: every e4m3 value is a bf16 value
    return out.mul_(w.scale)  # in fp32, rounded once to `dtype`, as the unbuffered branch


@jit
def _quantize_rows_kernel(x_ptr, c_ptr, y_ptr, s_ptr, stride_x, stride_y, n_cols, BLOCK: tl.constexpr,
                          HAS_COL_SCALE: tl.constexpr):
    # One row per program, held in registers: (times the column scales), its max, then the scaled cast.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_COL_SCALE:
        x = x * tl.load(c_ptr + cols, mask=mask, other=0.0)
    amax = tl.maximum(tl.max(tl.abs(x), axis=0), 1e-12)
    tl.store(s_ptr + row, tl.fdiv(amax, 0.0 * amax + 448.0, ieee_rounding=True))  # IEEE division, as torch's
    y = tl.minimum(tl.maximum(x * tl.fdiv(448.0 + 0.0 * amax, amax, ieee_rounding=True), -448.0), 448.0)
    # Round to the e4m3 grid in fp32 first (to nearest even), so that the cast below is exact: the
    # interpreter's fp32 -> fp8 cast mishandles a rounding carry, the GPU's rounds to nearest even.
    e = ((y.to(tl.uint32, bitcast=True) >> 23) & 0xFF).to(tl.int32) - 127
    e = tl.maximum(e, -6)  # below 2^-6 e4m3 is subnormal: a fixed step of 2^-9
    step = ((e + 124).to(tl.uint32) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3): 3 mantissa bits
    y = ((y / step + 12582912.0) - 12582912.0) * step  # + 1.5 * 2^23 rounds |q| < 2^22 to an integer
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _quantize_rows_triton(x2: torch.Tensor, col_scale: torch.Tensor | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    block, num_warps = row_block(n_cols)
    y = torch.empty((n_rows, n_cols), dtype=E4M3, device=x2.device)
    s = torch.empty((n_rows, 1), dtype=torch.float32, device=x2.device)
    c = x2 if col_scale is None else col_scale.reshape(-1).to(torch.float32).contiguous()
    if n_rows:
        _quantize_rows_kernel[(n_rows,)](x2, c, y, s, x2.stride(0), y.stride(0), n_cols, BLOCK=block,
                                         HAS_COL_SCALE=col_scale is not None, num_warps=num_warps)
    return y, s


def quantize_rows_reference(x2: torch.Tensor, col_scale: torch.Tensor | None = None
                            ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, s): e4m3 rows and their fp32 scales (N, 1), in the kernel's arithmetic; with `col_scale` (M
    values, e.g. a weight's (M, 1) row scales) the rows of x2 * col_scale^T."""
    xf = x2.to(torch.float32)
    if col_scale is not None:
        xf = xf * col_scale.reshape(1, -1).to(torch.float32)
    amax = xf.abs().amax(dim=1, keepdim=True).clamp(min=TINY)
    y = (xf * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return y, amax / E4M3_MAX


def quantize_rows_fp8(x2: torch.Tensor, force_triton: bool | None = None,
                      col_scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation of a 2-D tensor with unit column stride (times `col_scale` per column, when
    given: the backward folds a weight's row scales into dy): Triton on CUDA, torch elsewhere."""
    if x2.dim() != 2 or (x2.shape[1] > 1 and x2.stride(1) != 1):
        raise ValueError(f"quantize_rows_fp8: expected a row-major 2-D tensor, got {tuple(x2.shape)} "
                         f"with strides {x2.stride()}")
    if col_scale is not None and col_scale.numel() != x2.shape[1]:
        raise ValueError(f"quantize_rows_fp8: {col_scale.numel()} column scales for {x2.shape[1]} columns")
    if use_triton(x2, col_scale, force=force_triton):
        return _quantize_rows_triton(x2, col_scale)
    return quantize_rows_reference(x2, col_scale)


def fp8_supported(device: torch.device) -> bool:
    """FP8 tensor-core products: CUDA compute capability 8.9 or newer (L4, L40, H100, ...)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_linear(x2: torch.Tensor, w: FP8Weight, out_dtype: torch.dtype = torch.bfloat16,
               x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x W^T (N, out) in `out_dtype` from x (N, in) and an FP8 weight; `x_fp8`: x already quantised
    (several weights reading one x quantise it once)."""
    x8, sx = x_fp8 if x_fp8 is not None else quantize_rows_fp8(x2)
    if x8.is_cuda:
        return torch._scaled_mm(x8, w.data.t(), scale_a=sx, scale_b=w.scale.t(), out_dtype=out_dtype)
    return fp8_linear_reference(x8, sx, w, out_dtype)


def fp8_linear_reference(x8: torch.Tensor, sx: torch.Tensor, w: FP8Weight,
                         out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The product in fp32 from the same FP8 operands: what the tensor cores compute, up to summation
    order."""
    return ((x8.to(torch.float32) @ w.data.to(torch.float32).t()) * sx * w.scale.t()).to(out_dtype)


def _cores_apply(t2: torch.Tensor, w: FP8Weight) -> bool:
    """t2 (x (N, in) or dy (N, out)) times w on FP8 tensor cores: on the GPU, each dimension a multiple of
    16."""
    out_f, in_f = w.data.shape
    return t2.is_cuda and t2.shape[0] % 16 == 0 and out_f % 16 == 0 and in_f % 16 == 0


def fp8_input(x2: torch.Tensor, *weights) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x quantised once for the FP8 weights among `weights` that will take the tensor-core path, or None."""
    if any(isinstance(w, FP8Weight) and _cores_apply(x2, w) for w in weights):
        return quantize_rows_fp8(x2)
    return None


def fp8_product(x2: torch.Tensor, w: FP8Weight, dt: torch.dtype,
                x_fp8: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """x W^T in `dt`: on FP8 tensor cores where the shapes allow (every dimension a multiple of 16, on the
    GPU); on the CPU the same FP8 operands multiplied in fp32 (an emulation, for tests and for loss curves
    of the FP8 numerics on real weights); on the GPU otherwise (decoding one token, odd packed lengths)
    against the bf16 dequantisation."""
    if _cores_apply(x2, w):
        return fp8_linear(x2, w, torch.bfloat16, x_fp8).to(dt)
    if not x2.is_cuda:
        return fp8_linear_reference(*(x_fp8 or quantize_rows_reference(x2)), w, dt)
    return x2 @ dequantize_fp8(w, dt, reuse_buffer=True).t()


_t_buffers = Scratch()
_unit_scales: dict[tuple[torch.device, int], torch.Tensor] = {}


@jit
def _transpose_kernel(x_ptr, y_ptr, n_rows, n_cols, BLOCK: tl.constexpr):
    # One (BLOCK, BLOCK) tile per program, read along x's rows and written along y's rows (the transpose
    # goes through shared memory): both sides coalesced, where an elementwise copy strides one of them.
    rows = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    tile = tl.load(x_ptr + rows[:, None] * n_cols + cols[None, :],
                   mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0)  # (BLOCK, BLOCK)
    tl.store(y_ptr + cols[:, None] * n_rows + rows[None, :], tl.trans(tile),
             mask=(cols[:, None] < n_cols) & (rows[None, :] < n_rows))


_TRANSPOSE_BLOCK = 64


@torch.no_grad()
def transpose_fp8(w: FP8Weight, force_triton: bool | None = None) -> torch.Tensor:
    """W8^T (in, out) e4m3, contiguous, in one buffer per device (the largest weight so far) that the next
    call overwrites: the caller runs its product before transposing again. Moved as bytes (exact): a tiled
    Triton transpose on CUDA, torch's copy elsewhere."""
    out_f, in_f = w.data.shape
    n = w.data.numel()
    wt = _t_buffers.get(w.data.device, n, torch.uint8, w.data.device).view(in_f, out_f)
    src = w.data.view(torch.uint8)
    if not src.is_contiguous():
        src = src.contiguous()
    if use_triton(src, force=force_triton):
        if n:
            grid = (cdiv(out_f, _TRANSPOSE_BLOCK), cdiv(in_f, _TRANSPOSE_BLOCK))
            _transpose_kernel[grid](src, wt, out_f, in_f, BLOCK=_TRANSPOSE_BLOCK, num_warps=4)
    else:
        wt.copy_(src.t())
    return wt.view(E4M3)


def _unit_scale(n: int, device: torch.device) -> torch.Tensor:
    """(1, n) fp32 ones: the column scales of d8 W8 (W's scales are folded into d8)."""
    key = (device, n)
    if key not in _unit_scales:
        _unit_scales[key] = torch.ones(1, n, dtype=torch.float32, device=device)
    return _unit_scales[key]


def fp8_grad_reference(d8: torch.Tensor, sd: torch.Tensor, w: FP8Weight,
                       out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """sd * (d8 W8) in fp32 from the same FP8 operands: what the tensor cores compute, up to summation
    order."""
    return ((d8.to(torch.float32) @ w.data.to(torch.float32)) * sd).to(out_dtype)


def fp8_grad_input(dy2: torch.Tensor, w: FP8Weight, dt: torch.dtype) -> torch.Tensor:
    """dx = dy W (N, in) in `dt` from dy (N, out) and an FP8 weight (module docstring): on FP8 tensor cores
    where the shapes allow (as `fp8_product`); on the CPU the same FP8 operands multiplied in fp32; on the GPU
    otherwise against the bf16 dequantisation."""
    if not dy2.is_cuda or _cores_apply(dy2, w):
        dy2 = dy2 if dy2.shape[1] <= 1 or dy2.stride(1) == 1 else dy2.contiguous()
        d8, sd = quantize_rows_fp8(dy2, col_scale=w.scale)  # (N, out) e4m3, (N, 1): dy diag(sw) ~ sd * d8
        if not dy2.is_cuda:
            return fp8_grad_reference(d8, sd, w, dt)
        wt = transpose_fp8(w)  # (in, out): W8 column-major as (out, in)
        dx = torch._scaled_mm(d8, wt.t(), scale_a=sd, scale_b=_unit_scale(wt.shape[0], wt.device),
                              out_dtype=torch.bfloat16)
        return dx if dt == torch.bfloat16 else dx.to(dt)
    return (dy2 @ dequantize_fp8(w, dy2.dtype, reuse_buffer=True)).to(dt)
