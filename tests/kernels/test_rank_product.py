"""The one-pass rank-r product c + a b against torch: output and gradients, fp32 and bf16, odd shapes and
ranks (one, a LoRA rank, three ranks side by side), with and without c, in place over c, operand errors."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_bf16_close, assert_fp32_close

from fasttune.kernels import rank_product as rp
from fasttune.kernels.rank_product import rank_product, rank_product_reference

# (rows, columns, rank): one element; primes past a tile both ways; a LoRA rank; three ranks side by side
SHAPES = [(1, 1, 1), (7, 13, 3), (67, 131, 16), (130, 257, 48)]


def _inputs(n, m, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, r, generator=g)
    b = torch.randn(r, m, generator=g) / r**0.5
    c = torch.randn(n, m, generator=g) * 4  # a residual stream: larger than the rank-r term
    dout = torch.randn(n, m, generator=g)
    return a, b, c, dout


def _run(fn, a, b, c, dout):
    leaves = [t.detach().clone().requires_grad_(True) if t is not None else None for t in (a, b, c)]
    out = fn(*leaves)
    out.backward(dout.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves if t is not None]


@pytest.mark.parametrize("with_c", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rank_product_fp32(device, shape, with_c):
    a, b, c, dout = (t.to(device) for t in _inputs(*shape))
    c = c if with_c else None
    kern = _run(lambda *t: rank_product(*t, force_triton=True), a, b, c, dout)
    exact = _run(rank_product_reference, a.double(), b.double(), None if c is None else c.double(),
                 dout.double())
    for k, e, what in zip(kern, exact, ["out", "da", "db", "dc"]):
        assert k.dtype == torch.float32
        assert_fp32_close(k, e, f"rank_product {what} {shape} c={with_c}")


@pytest.mark.parametrize("with_c", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rank_product_bf16(device, shape, with_c):
    a, b, c, dout = (t.to(device).bfloat16() for t in _inputs(*shape, seed=1))
    c = c if with_c else None
    got = rp._rank_product_fwd(a, b, c)
    eager = rank_product_reference(a, b, c)
    exact = rank_product_reference(a.double(), b.double(), None if c is None else c.double())
    assert got.dtype == torch.bfloat16
    assert_bf16_close(got, eager, exact, f"rank_product {shape} c={with_c}")


def test_in_place_over_c_and_strided_operands(device):
    """out = c (the layer writes residual + term over a buffer it owns); a as a column view of a wider
    product and b as a transposed view, as `kernels/lora.py` passes x A^T and (s B^T)."""
    a, b, c, _ = (t.to(device) for t in _inputs(67, 131, 16, seed=2))
    wide = torch.cat([a, torch.randn_like(a)], 1)
    bt = b.t().contiguous().t()  # (r, M) with column stride r
    want = torch.addmm(c.double(), a.double(), b.double())
    buf = c.clone()
    got = rp._rank_product_fwd(wide[:, :16], bt, buf, out=buf)
    assert got.data_ptr() == buf.data_ptr()
    assert_fp32_close(got, want, "rank_product in place")


def test_operands_that_do_not_fit_are_named():
    a, b, c, _ = _inputs(5, 9, 4)
    with pytest.raises(ValueError, match=r"rank_product: a \(5, 4\).*b \(3, 9\)"):
        rank_product(a, b[:3])
    with pytest.raises(ValueError, match="rank_product"):
        rank_product(a, b, c[:, :8])
    with pytest.raises(ValueError, match="rank_product"):
        rank_product(a, b.double())
