"""RMSNorm Triton path vs `rms_norm_reference`: forward, dx and dw, fp32 and bf16, odd shapes."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_bf16_close, assert_fp32_close

from fasttune.kernels.rms_norm import RMSNormFunction, rms_norm, rms_norm_reference

# (300, 32): five 64-row tiles over four programs in the backward, the last tiles partial or empty.
SHAPES = [(1, 1, 7), (2, 5, 37), (3, 128), (11, 1, 96), (300, 32)]


def _run(fn, x, w, dy, eps=1e-6):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    y = fn(x, w, eps)
    y.backward(dy.to(y.dtype))
    return y.detach(), x.grad, w.grad


def _inputs(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g) + 1
    dy = torch.randn(shape, generator=g)
    return x.to(device), w.to(device), dy.to(device)


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_fp32(device, shape):
    x, w, dy = _inputs(shape, device)
    kern = _run(lambda *a: RMSNormFunction.apply(*a), x, w, dy)
    exact = _run(rms_norm_reference, x.double(), w.double(), dy.double())
    for k, e, what in zip(kern, exact, ["y", "dx", "dw"]):
        assert k.dtype == torch.float32
        assert_fp32_close(k, e, f"rms_norm {what} {shape}")


@pytest.mark.parametrize("shape", SHAPES)
def test_rms_norm_bf16(device, shape):
    x, w, dy = _inputs(shape, device, seed=1)
    xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
    kern = _run(lambda *a: RMSNormFunction.apply(*a), xb, wb, dyb)
    eager = _run(rms_norm_reference, xb, wb, dyb)
    exact = _run(rms_norm_reference, xb.double(), wb.double(), dyb.double())
    for k, e, x64, what in zip(kern, eager, exact, ["y", "dx", "dw"]):
        assert k.dtype == torch.bfloat16
        assert_bf16_close(k, e, x64, f"rms_norm {what} {shape}")


def test_rms_norm_forward_matches_reference_rounding(device):
    # Same rounding points as the reference: the bf16 forward is (nearly always) bit-identical.
    x, w, _ = _inputs((4, 64), device, seed=2)
    xb, wb = x.bfloat16(), w.bfloat16()
    y = RMSNormFunction.apply(xb, wb, 1e-5)
    ref = rms_norm_reference(xb, wb, 1e-5)
    assert (y != ref).float().mean().item() < 0.02


def test_rms_norm_mixed_dtypes_promote(device):
    # An fp32 weight on bf16 activations promotes the output to fp32, as the reference does.
    x, w, dy = _inputs((3, 33), device, seed=3)
    kern = _run(lambda *a: RMSNormFunction.apply(*a), x.bfloat16(), w, dy)
    eager = _run(rms_norm_reference, x.bfloat16(), w, dy)
    assert kern[0].dtype == eager[0].dtype == torch.float32
    assert kern[1].dtype == torch.bfloat16 and kern[2].dtype == torch.float32
    torch.testing.assert_close(kern[0], eager[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kern[2], eager[2], rtol=1e-4, atol=1e-4)


def test_rms_norm_public_op_on_cpu_is_reference():
    x, w, _ = _inputs((2, 3, 16), "cpu")
    assert torch.equal(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6))
    with pytest.raises(ValueError, match="last dimension"):
        rms_norm(x, w[:8], 1e-6)


def test_rms_norm_public_op_forced(device):
    x, w, _ = _inputs((2, 3, 16), device)
    torch.testing.assert_close(rms_norm(x, w, 1e-6, force_triton=True), rms_norm_reference(x, w, 1e-6))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 5, 37), (300, 32)])
def test_rms_norm_backward_adds_the_addend(device, shape, dtype):
    """An addend (a residual branch's gradient) joins dx in the kernel's write: dx = the norm's dx + addend,
    with dw unchanged; the public op takes it as `grad_addend` on either path, and refuses one of another
    shape."""
    x, w, dy = (t.to(dtype) for t in _inputs(shape, device, seed=4))
    addend = (torch.randn(shape, generator=torch.Generator().manual_seed(9)) * 2).to(device, dtype)
    plain = _run(lambda *a: RMSNormFunction.apply(*a), x, w, dy)
    fused = _run(lambda *a: RMSNormFunction.apply(*a, addend), x, w, dy)
    exact = _run(rms_norm_reference, x.double(), w.double(), dy.double())
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[2], plain[2])  # y and dw as without it
    want = exact[1] + addend.double()
    if dtype == torch.float32:
        assert_fp32_close(fused[1], want, f"rms_norm dx + addend {shape}")
    else:
        assert_bf16_close(fused[1], plain[1] + addend, want, f"rms_norm dx + addend {shape}")
    for force in (True, False):  # the kernel and the torch path take it
        got = _run(lambda *a, f=force: rms_norm(*a, force_triton=f, grad_addend=addend), x, w, dy)
        without = _run(lambda *a, f=force: rms_norm(*a, force_triton=f), x, w, dy)
        torch.testing.assert_close(got[1].double(), want, rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(without[1], plain[1], rtol=1e-2, atol=1e-2)
        with pytest.raises(ValueError, match="grad_addend"):
            rms_norm(x, w, 1e-6, force_triton=force, grad_addend=addend[..., :1])
