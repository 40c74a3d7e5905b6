"""FP8 (e4m3) products for a frozen base weight: y = x W^T with both operands in FP8 and per-row scales.

    weight  W (out, in) -> W8 (out, in) e4m3 and sw (out, 1) fp32, W ~ sw * W8 (once, at load)
    input   x (N, in)   -> x8 (N, in) e4m3 and sx (N, 1) fp32, x ~ sx * x8 (each product; one Triton pass:
                           row max, scale to the e4m3 range, cast)
    product y = sx * (x8 W8^T) * sw^T in bf16 (`torch._scaled_mm` with row-wise scales: FP8 tensor cores)
Scales: s = max|row| / 448 (e4m3's largest finite value), so a row's largest element maps to 448; a zero
row gets s = 1e-12 / 448 and stays zero. The backward of a LoRA layer reads W in bf16: `dequantize_fp8`
writes sw * W8 into a buffer shared by all layers (input gradients stay in bf16, only forward products and
their reruns are FP8).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fasttune.kernels._dispatch import jit, row_block, tl, use_triton

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


_buffers: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


@torch.no_grad()
def dequantize_fp8(w: FP8Weight, dtype: torch.dtype = torch.bfloat16, reuse_buffer: bool = False
                   ) -> torch.Tensor:
    """scale * data in `dtype`; with `reuse_buffer`, written into one buffer per device and dtype (the
    largest weight so far), which the next call overwrites: the caller uses it before dequantising again."""
    out_shape = tuple(w.data.shape)
    if not reuse_buffer:
        return (w.data.to(torch.float32) * w.scale).to(dtype)
    key = (w.data.device, dtype)
    n = w.data.numel()
    buf = _buffers.get(key)
    if buf is None or buf.numel() < n:
        buf = _buffers[key] = torch.empty(n, dtype=dtype, device=w.data.device)
    out = buf[:n].view(out_shape)
    out.copy_(w.data)  # exact: every e4m3 value is a bf16 value
    return out.mul_(w.scale)  # in fp32, rounded once to `dtype`, as the unbuffered branch


@jit
def _quantize_rows_kernel(x_ptr, y_ptr, s_ptr, stride_x, stride_y, n_cols, BLOCK: tl.constexpr):
    # One row per program, held in registers: its max, then the scaled cast.
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
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


def _quantize_rows_triton(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    n_rows, n_cols = x2.shape
    block, num_warps = row_block(n_cols)
    y = torch.empty((n_rows, n_cols), dtype=E4M3, device=x2.device)
    s = torch.empty((n_rows, 1), dtype=torch.float32, device=x2.device)
    if n_rows:
        _quantize_rows_kernel[(n_rows,)](x2, y, s, x2.stride(0), y.stride(0), n_cols, BLOCK=block,
                                         num_warps=num_warps)
    return y, s


def quantize_rows_reference(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x8, s): e4m3 rows and their fp32 scales (N, 1), in the kernel's arithmetic."""
    xf = x2.to(torch.float32)
    amax = xf.abs().amax(dim=1, keepdim=True).clamp(min=TINY)
    y = (xf * (E4M3_MAX / amax)).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return y, amax / E4M3_MAX


def quantize_rows_fp8(x2: torch.Tensor, force_triton: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row e4m3 quantisation of a 2-D tensor with unit column stride: Triton on CUDA, torch elsewhere."""
    if x2.dim() != 2 or (x2.shape[1] > 1 and x2.stride(1) != 1):
        raise ValueError(f"quantize_rows_fp8: expected a row-major 2-D tensor, got {tuple(x2.shape)} "
                         f"with strides {x2.stride()}")
    if use_triton(x2, force=force_triton):
        return _quantize_rows_triton(x2)
    return quantize_rows_reference(x2)


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
    """The product in fp32 from the same FP8 operands: what the tensor cores compute, up to summation order."""
    return ((x8.to(torch.float32) @ w.data.to(torch.float32).t()) * sx * w.scale.t()).to(out_dtype)


def _cores_apply(x2: torch.Tensor, w: FP8Weight) -> bool:
    n, k = x2.shape
    return x2.is_cuda and n % 16 == 0 and k % 16 == 0 and w.data.shape[0] % 16 == 0


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
