"""FP8 row quantisation (Triton vs reference, with and without column scales), the FP8 products (forward
x W^T, backward dy W) against fp32 math on the same operands, and the bf16 dequantisation and the FP8
transpose into their shared buffers."""

from __future__ import annotations

import pytest
import torch

from fasttune.kernels.fp8 import (
    E4M3,
    E4M3_MAX,
    FP8Weight,
    dequantize_fp8,
    fp8_grad_input,
    fp8_grad_reference,
    fp8_linear,
    fp8_linear_reference,
    quantize_rows_fp8,
    quantize_rows_reference,
    quantize_weight_fp8,
    transpose_fp8,
)

SHAPES = [(1, 16), (5, 48), (33, 96), (7, 1000)]


def _x(shape, device, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * torch.logspace(-2, 2, shape[0])[:, None]  # rows of every scale
    return x.to(device=device, dtype=dtype)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_kernel_matches_reference(device, shape, dtype):
    x = _x(shape, device, dtype)
    x[0, :] = 0  # a zero row keeps a finite scale and stays zero
    y, s = quantize_rows_fp8(x, force_triton=True)
    y_ref, s_ref = quantize_rows_reference(x)
    assert y.dtype == E4M3 and s.shape == (shape[0], 1) and s.dtype == torch.float32
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    yk, yr = y.float(), y_ref.float()
    assert (yk.abs() <= E4M3_MAX).all() and (yk[0] == 0).all()
    assert torch.equal(yk, yr)  # both round to nearest even on the e4m3 grid
    # Each row's largest element maps to the top of the range, and the round trip is within half a step.
    assert torch.allclose(yk.abs().amax(1)[1:], torch.full((shape[0] - 1,), E4M3_MAX, device=yk.device))
    back = yk * s
    assert ((back - x.float()).abs() <= x.float().abs() / 16 + s * 2.0 ** -9 + 1e-30).all()


def test_quantize_rows_rejects_strided_columns(device):
    with pytest.raises(ValueError, match="row-major"):
        quantize_rows_fp8(_x((8, 32), device).t())


@pytest.mark.parametrize("shape", [(16, 32, 48), (48, 96, 160)])  # FP8 tensor cores: multiples of 16
def test_fp8_linear_is_the_fp32_product_of_its_operands(device, shape):
    n, k, m = shape
    x, w = _x((n, k), device), _x((m, k), device, seed=1) / 10
    w8 = quantize_weight_fp8(w)
    assert w8.data.dtype == E4M3 and w8.scale.shape == (m, 1)
    x8, sx = quantize_rows_fp8(x)
    y = fp8_linear(x, w8)
    ref = fp8_linear_reference(x8, sx, w8, torch.float32)
    assert y.dtype == torch.bfloat16 and y.shape == (n, m)
    torch.testing.assert_close(y.float(), ref, rtol=2 ** -7, atol=1e-3 * ref.abs().max().item())
    # and it approximates the bf16 product within FP8's precision (3 mantissa bits per operand)
    exact = x.float() @ w.float().t()
    rel = (y.float() - exact).norm() / exact.norm()
    assert rel < 0.08, rel


def test_dequantize_into_shared_buffer(device):
    a, b = quantize_weight_fp8(_x((64, 32), device)), quantize_weight_fp8(_x((16, 32), device, seed=2))
    da = dequantize_fp8(a, torch.bfloat16, reuse_buffer=True)
    torch.testing.assert_close(da, dequantize_fp8(a, torch.bfloat16), rtol=0, atol=0)
    db = dequantize_fp8(b, torch.bfloat16, reuse_buffer=True)
    assert db.data_ptr() == da.data_ptr()  # one buffer, overwritten
    torch.testing.assert_close(db, (b.data.float() * b.scale).to(torch.bfloat16), rtol=0, atol=0)
    with pytest.raises(ValueError, match="weight"):
        quantize_weight_fp8(torch.ones(3, device=device))
    assert isinstance(a, FP8Weight)


@pytest.mark.parametrize("shape", SHAPES)
def test_quantize_rows_with_column_scales_kernel_matches_reference(device, shape):
    x = _x(shape, device)
    g = torch.Generator().manual_seed(3)
    col = torch.logspace(-4, -1, shape[1])[torch.randperm(shape[1], generator=g)]
    col = col[:, None].to(device)  # as a weight's (M, 1) row scales
    y, s = quantize_rows_fp8(x, force_triton=True, col_scale=col)
    y_ref, s_ref = quantize_rows_reference(x, col)
    torch.testing.assert_close(s, s_ref, rtol=1e-6, atol=0)
    assert torch.equal(y.float(), y_ref.float())
    # the column scales are folded in before the row max: the rows of x * col^T, quantised
    y_fold, s_fold = quantize_rows_reference(x.float() * col.t())
    assert torch.equal(y_ref.float(), y_fold.float()) and torch.equal(s_ref, s_fold)
    with pytest.raises(ValueError, match="column scales"):
        quantize_rows_fp8(x, col_scale=col[1:])


@pytest.mark.parametrize("shape", [(64, 32), (16, 48), (100, 70)])
def test_transpose_fp8_kernel_matches_torch(device, shape):
    w8 = quantize_weight_fp8(_x(shape, device))
    wt = transpose_fp8(w8, force_triton=True)
    assert wt.dtype == E4M3 and wt.shape == shape[::-1] and wt.is_contiguous()
    assert torch.equal(wt.view(torch.uint8), w8.data.view(torch.uint8).t())  # bytes: NaN-free, exact
    assert torch.equal(transpose_fp8(w8, force_triton=False).view(torch.uint8), w8.data.view(torch.uint8).t())


def test_transpose_fp8_into_shared_buffer(any_device):
    a = quantize_weight_fp8(_x((64, 32), any_device))
    b = quantize_weight_fp8(_x((16, 48), any_device, seed=2))
    at = transpose_fp8(a)
    assert torch.equal(at.float(), a.data.float().t())
    bt = transpose_fp8(b)
    assert bt.data_ptr() == at.data_ptr() and torch.equal(bt.float(), b.data.float().t())  # one buffer


# (N, out, in): every dimension a multiple of 16 (tensor cores on the GPU), and not (the GPU falls back)
GRAD_SHAPES = [(16, 32, 48), (48, 160, 96), (5, 48, 32), (32, 40, 64)]


@pytest.mark.parametrize("shape", GRAD_SHAPES)
def test_fp8_grad_input_folds_the_weight_scales_into_dy(any_device, shape):
    n, out_f, in_f = shape
    dy = _x((n, out_f), any_device)
    w8 = quantize_weight_fp8(_x((out_f, in_f), any_device, seed=1) / 10)  # row scales over four decades
    dx = fp8_grad_input(dy, w8, torch.float32)
    assert dx.shape == (n, in_f) and dx.dtype == torch.float32
    w = dequantize_fp8(w8, torch.bfloat16)
    if any_device == "cuda" and any(d % 16 for d in shape):  # odd shapes: the dequantised product
        torch.testing.assert_close(dx, (dy @ w).float(), rtol=0, atol=0)
        return
    ref = fp8_grad_reference(*quantize_rows_reference(dy, w8.scale), w8, torch.float32)
    if any_device == "cpu":
        assert torch.equal(dx, ref)  # the emulation: the same e4m3 operands multiplied in fp32
    else:  # FP8 tensor cores, a bf16 output
        torch.testing.assert_close(dx, ref, rtol=2 ** -7, atol=1e-3 * ref.abs().max().item())
    # within FP8's precision of the product with the dequantised weight, and not that product
    exact = dy.float() @ w.float()
    rel = ((dx - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 0.06, rel
