"""RoPE Triton path vs `apply_rope_reference`: q and k outputs and gradients, fp32 and bf16, odd shapes."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_bf16_close, assert_fp32_close

from fasttune.kernels.rope import (
    RoPEFunction,
    apply_rope,
    apply_rope_reference,
    rope_backward,
    rope_backward_reference,
)

# (B, T, n_heads, n_kv_heads, head_dim, cos batch)
# The last shape spans several (64-row) tiles of q and of k.
SHAPES = [(1, 1, 1, 1, 2, 1), (2, 5, 3, 1, 6, 2), (1, 7, 4, 2, 16, 1), (3, 3, 5, 5, 10, 3),
          (2, 40, 3, 1, 64, 1)]


def _angles(B, T, hd, g, scatter=False):
    """HF-style cos/sin (B, T, hd): the frequencies repeated across both halves."""
    pos = torch.randint(0, 50, (B, T), generator=g).float()
    inv = 1.0 / (10000 ** (torch.arange(0, hd, 2).float() / hd))
    ang = pos[..., None] * inv  # (B, T, hd/2)
    emb = torch.cat((ang, ang), dim=-1)  # (B, T, hd)
    if scatter:  # halves that differ, to check the general (transposed) backward
        emb = emb + torch.randn(emb.shape, generator=g)
    return emb.cos(), emb.sin()


def _inputs(shape, device, seed=0, scatter=False):
    B, T, nh, nkv, hd, cb = shape
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, nh, hd, generator=g)
    k = torch.randn(B, T, nkv, hd, generator=g)
    cos, sin = _angles(cb, T, hd, g, scatter)
    dq = torch.randn(B, T, nh, hd, generator=g)
    dk = torch.randn(B, T, nkv, hd, generator=g)
    return [t.to(device) for t in (q, k, cos, sin, dq, dk)]


def _run(fn, q, k, cos, sin, dq, dk):
    q = q.detach().clone().requires_grad_(True)
    k = k.detach().clone().requires_grad_(True)
    qo, ko = fn(q, k, cos, sin)
    torch.autograd.backward((qo, ko), (dq.to(qo.dtype), dk.to(ko.dtype)))
    return qo.detach(), ko.detach(), q.grad, k.grad


NAMES = ["q_out", "k_out", "dq", "dk"]


@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_rope_fp32(device, shape, scatter):
    q, k, cos, sin, dq, dk = _inputs(shape, device, scatter=scatter)
    kern = _run(RoPEFunction.apply, q, k, cos, sin, dq, dk)
    exact = _run(apply_rope_reference, q.double(), k.double(), cos.double(), sin.double(), dq.double(),
                 dk.double())
    for a, e, what in zip(kern, exact, NAMES):
        assert a.dtype == torch.float32
        assert_fp32_close(a, e, f"rope {what} {shape}")


@pytest.mark.parametrize("shape", SHAPES)
def test_rope_bf16(device, shape):
    q, k, cos, sin, dq, dk = _inputs(shape, device, seed=1)
    args = [q.bfloat16(), k.bfloat16(), cos.bfloat16(), sin.bfloat16(), dq.bfloat16(), dk.bfloat16()]
    kern = _run(RoPEFunction.apply, *args)
    eager = _run(apply_rope_reference, *args)
    exact = _run(apply_rope_reference, *[a.double() for a in args])
    for a, e, x64, what in zip(kern, eager, exact, NAMES):
        assert a.dtype == torch.bfloat16
        assert_bf16_close(a, e, x64, f"rope {what} {shape}")


def test_rope_strided_inputs(device):
    # q and k as views of one fused projection (non-contiguous heads), as a packed-QKV caller would pass.
    B, T, nh, nkv, hd = 2, 3, 4, 2, 8
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(B, T, (nh + 2 * nkv) * hd, generator=g).to(device)
    q = qkv[..., : nh * hd].view(B, T, nh, hd)  # (B, T, nh, hd), row stride (nh + 2 nkv) hd
    k = qkv[..., nh * hd: (nh + nkv) * hd].view(B, T, nkv, hd)
    cos, sin = (t.to(device) for t in _angles(B, T, hd, g))
    got = RoPEFunction.apply(q, k, cos, sin)
    want = apply_rope_reference(q, k, cos, sin)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_rope_public_op_on_cpu_is_reference():
    q, k, cos, sin, _, _ = _inputs((2, 5, 3, 1, 6, 2), "cpu")
    for a, b in zip(apply_rope(q, k, cos, sin), apply_rope_reference(q, k, cos, sin)):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="cos must be"):
        apply_rope(q, k, cos[:, :2], sin)
    with pytest.raises(ValueError, match="does not match q"):
        apply_rope(q, k[:, :, :, :4], cos, sin)


def test_rope_public_op_forced(device):
    q, k, cos, sin, _, _ = _inputs((1, 7, 4, 2, 16, 1), device)
    for a, b in zip(apply_rope(q, k, cos, sin, force_triton=True), apply_rope_reference(q, k, cos, sin)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scatter", [False, True])
@pytest.mark.parametrize("shape", SHAPES[1:])
def test_rope_backward_without_the_graph(device, shape, scatter):
    """`rope_backward` (Triton, and its torch reference) gives autograd's input gradients of the forward,
    for gradients laid out as an attention backward returns them ((B, H, T, D) transposed: strided)."""
    q, k, cos, sin, dq, dk = _inputs(shape, device, seed=4, scatter=scatter)
    exact = _run(apply_rope_reference, q.double(), k.double(), cos.double(), sin.double(), dq.double(),
                 dk.double())[2:]
    dq_s, dk_s = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (dq, dk))  # same values, strided
    kernel = rope_backward(dq_s, dk_s, cos, sin, force_triton=True)
    for got in (kernel, rope_backward_reference(dq_s, dk_s, cos, sin)):
        for a, e, what in zip(got, exact, ("dq", "dk")):
            assert a.shape == e.shape and a.dtype == torch.float32
            assert_fp32_close(a, e, f"rope_backward {what} {shape}")
