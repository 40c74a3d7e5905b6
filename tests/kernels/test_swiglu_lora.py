"""SwiGLU with in-kernel LoRA terms vs `swiglu_lora_reference`: output and all six gradients, fp32 and bf16,
odd shapes and ranks, column views like `lora_mlp` passes; the in-place backward; operand errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_bf16_close, assert_fp32_close

from fasttune.kernels import swiglu_lora as sl
from fasttune.kernels.swiglu_lora import SwiGLULoRAFunction, swiglu_lora, swiglu_lora_reference

# (rows, inter, rank): one row; primes past a tile in both directions; rank 1 and 16 and a non-power of two
SHAPES = [(1, 1, 1), (7, 13, 3), (67, 131, 16), (130, 257, 24)]
NAMES = ["h", "d g0", "d u0", "d xa_g", "d b_g", "d xa_u", "d b_u"]


def _inputs(n, inter, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    gate0 = torch.randn(n, inter, generator=g) * 3
    up0 = torch.randn(n, inter, generator=g)
    xa = torch.randn(n, 2 * r, generator=g)  # both adapters' x A^T from one product, as `lora_mlp` has them
    b_g, b_u = torch.randn(inter, r, generator=g) / r**0.5, torch.randn(inter, r, generator=g) / r**0.5
    dh = torch.randn(n, inter, generator=g)
    return gate0, up0, xa, b_g, b_u, dh


def _run(fn, gate0, up0, xa, b_g, b_u, dh):
    leaves = [t.detach().clone().requires_grad_(True) for t in (gate0, up0, xa, b_g, b_u)]
    g0, u0, xa_, bg, bu = leaves
    r = bg.shape[1]
    h = fn(g0, u0, xa_[:, :r], bg, xa_[:, r:], bu)
    h.backward(dh.to(h.dtype))
    dxa = xa_.grad
    return [h.detach(), g0.grad, u0.grad, dxa[:, :r], bg.grad, dxa[:, r:], bu.grad]


def _eager(g0, u0, xa_g, b_g, xa_u, b_u):
    """The plain torch formula in the inputs' dtype: what a framework without this kernel computes."""
    return F.silu(g0 + xa_g @ b_g.t()) * (u0 + xa_u @ b_u.t())


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_lora_fp32(device, shape):
    inputs = [t.to(device) for t in _inputs(*shape)]
    kern = _run(SwiGLULoRAFunction.apply, *inputs)
    exact = _run(swiglu_lora_reference, *(t.double() for t in inputs))
    for a, e, what in zip(kern, exact, NAMES):
        assert a.dtype == torch.float32
        assert_fp32_close(a, e, f"swiglu_lora {what} {shape}")


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_lora_bf16(device, shape):
    inputs = [t.to(device).bfloat16() for t in _inputs(*shape, seed=1)]
    kern = _run(SwiGLULoRAFunction.apply, *inputs)
    eager = _run(_eager, *inputs)
    exact = _run(_eager, *(t.double() for t in inputs))
    for a, e, x64, what in zip(kern, eager, exact, NAMES):
        assert a.dtype == torch.bfloat16
        assert_bf16_close(a, e, x64, f"swiglu_lora {what} {shape}")


def test_reference_is_swiglu_of_the_corrected_outputs():
    gate0, up0, xa, b_g, b_u, _ = _inputs(5, 9, 4, seed=2)
    g, u = gate0 + xa[:, :4] @ b_g.t(), up0 + xa[:, 4:] @ b_u.t()
    got = swiglu_lora_reference(gate0, up0, xa[:, :4], b_g, xa[:, 4:], b_u)
    torch.testing.assert_close(got, F.silu(g) * u)


def test_in_place_backward_writes_the_gradients_over_gate_and_up(device):
    gate0, up0, xa, b_g, b_u, dh = (t.to(device) for t in _inputs(67, 131, 16, seed=3))
    r = 16
    want = sl._swiglu_lora_bwd(dh, gate0, up0, xa[:, :r], b_g, xa[:, r:], b_u)
    g0, u0 = gate0.clone(), up0.clone()
    dg, du = sl._swiglu_lora_bwd(dh, g0, u0, xa[:, :r], b_g, xa[:, r:], b_u, inplace=True)
    assert dg.data_ptr() == g0.data_ptr() and du.data_ptr() == u0.data_ptr()
    torch.testing.assert_close(dg, want[0], rtol=0, atol=0)
    torch.testing.assert_close(du, want[1], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 13, 3), (67, 131, 16), (20, 1100, 16)])  # the last: two strips
def test_backward_makes_the_adapter_input_gradients(device, shape, dtype):
    """want_db: the same dg, du, and besides them c dg b_g, c du b_u from the kernel's per-strip sums, equal
    to the products of the stored dg, du (what `lora_mlp` would otherwise compute by reading them back)."""
    gate0, up0, xa, b_g, b_u, dh = (t.to(device, dtype) for t in _inputs(*shape, seed=5))
    r = shape[2]
    plain = sl._swiglu_lora_bwd(dh, gate0, up0, xa[:, :r], b_g, xa[:, r:], b_u)
    dg, du, dxa_g, dxa_u = sl._swiglu_lora_bwd(dh, gate0, up0, xa[:, :r], b_g, xa[:, r:], b_u,
                                               want_db=True, db_scales=(0.5, 3.0))
    assert torch.equal(dg, plain[0]) and torch.equal(du, plain[1])
    assert dxa_g.shape == dxa_u.shape == (shape[0], r) and dxa_g.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(dxa_g.float(), 0.5 * (dg.float() @ b_g.float()), **tol)
    torch.testing.assert_close(dxa_u.float(), 3.0 * (du.float() @ b_u.float()), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(7, 13, 3), (67, 131, 16), (20, 1100, 16)])
def test_backward_writes_h_over_dh(device, shape, dtype):
    """want_h: h = silu(g) u is written over dh, equal to the forward kernel's h, with dg, du and the (N, r)
    products exactly those of the plain backward."""
    gate0, up0, xa, b_g, b_u, dh = (t.to(device, dtype) for t in _inputs(*shape, seed=6))
    r = shape[2]
    ops = (xa[:, :r], b_g, xa[:, r:], b_u)
    buf = dh.clone()
    dg, du, h = sl._swiglu_lora_bwd(buf, gate0, up0, *ops, want_h=True)
    plain = sl._swiglu_lora_bwd(dh, gate0, up0, *ops)
    assert h.data_ptr() == buf.data_ptr()
    assert torch.equal(dg, plain[0]) and torch.equal(du, plain[1])
    assert torch.equal(h, sl._swiglu_lora_fwd(gate0, up0, *ops))
    buf = dh.clone()
    dg, du, dxa_g, dxa_u, h = sl._swiglu_lora_bwd(buf, gate0, up0, *ops, want_db=True, want_h=True)
    want = sl._swiglu_lora_bwd(dh, gate0, up0, *ops, want_db=True)
    assert torch.equal(h, sl._swiglu_lora_fwd(gate0, up0, *ops))
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    for got, ref in zip((dg, du, dxa_g, dxa_u), want):
        torch.testing.assert_close(got.float(), ref.float(), **tol)


def test_row_strided_gate_and_up(device):
    # gate0 and up0 as the two halves of one (N, 2 inter) product: row stride 2 inter.
    gate0, up0, xa, b_g, b_u, _ = (t.to(device) for t in _inputs(7, 13, 3, seed=4))
    both = torch.cat([gate0, up0], 1)
    got = sl._swiglu_lora_fwd(both[:, :13], both[:, 13:], xa[:, :3], b_g, xa[:, 3:], b_u)
    want = swiglu_lora_reference(gate0, up0, xa[:, :3], b_g, xa[:, 3:], b_u)
    assert_fp32_close(got, want.double(), "row-strided swiglu_lora")


def test_mismatched_operands_are_named():
    gate0, up0, xa, b_g, b_u, _ = _inputs(5, 9, 4)
    with pytest.raises(ValueError, match=r"swiglu_lora: gate \(5, 9\).*\(9, 4\)"):
        swiglu_lora(gate0, up0, xa[:, :4], b_g[:8], xa[:, 4:], b_u)
    with pytest.raises(ValueError, match="swiglu_lora"):
        swiglu_lora(gate0.t(), up0.t(), xa[:, :4], b_g, xa[:, 4:], b_u)
