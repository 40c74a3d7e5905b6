"""SwiGLU Triton path vs `swiglu_reference`: output and both gradients, fp32 and bf16, odd shapes."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_bf16_close, assert_fp32_close

from fasttune.kernels.swiglu import SwiGLUFunction, swiglu, swiglu_reference

SHAPES = [(1, 1, 1), (2, 7, 13), (3, 1, 1031), (4, 256)]


def _inputs(shape, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Gate values out to +-12 reach both flat tails of the sigmoid.
    gate = torch.randn(shape, generator=g) * 4
    up = torch.randn(shape, generator=g)
    dh = torch.randn(shape, generator=g)
    return gate.to(device), up.to(device), dh.to(device)


def _run(fn, gate, up, dh):
    gate = gate.detach().clone().requires_grad_(True)
    up = up.detach().clone().requires_grad_(True)
    h = fn(gate, up)
    h.backward(dh.to(h.dtype))
    return h.detach(), gate.grad, up.grad


NAMES = ["h", "dgate", "dup"]


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_fp32(device, shape):
    gate, up, dh = _inputs(shape, device)
    kern = _run(SwiGLUFunction.apply, gate, up, dh)
    exact = _run(swiglu_reference, gate.double(), up.double(), dh.double())
    for a, e, what in zip(kern, exact, NAMES):
        assert a.dtype == torch.float32
        assert_fp32_close(a, e, f"swiglu {what} {shape}")


@pytest.mark.parametrize("shape", SHAPES)
def test_swiglu_bf16(device, shape):
    gate, up, dh = (t.bfloat16() for t in _inputs(shape, device, seed=1))
    kern = _run(SwiGLUFunction.apply, gate, up, dh)
    eager = _run(swiglu_reference, gate, up, dh)
    exact = _run(swiglu_reference, gate.double(), up.double(), dh.double())
    for a, e, x64, what in zip(kern, eager, exact, NAMES):
        assert a.dtype == torch.bfloat16
        assert_bf16_close(a, e, x64, f"swiglu {what} {shape}")


def test_swiglu_non_contiguous_halves(device):
    # gate and up as the two halves of one fused projection output.
    g = torch.Generator().manual_seed(2)
    gu = torch.randn(3, 5, 2 * 11, generator=g).to(device)
    gate, up = gu[..., :11], gu[..., 11:]  # (3, 5, 11) views with row stride 22
    torch.testing.assert_close(SwiGLUFunction.apply(gate, up), swiglu_reference(gate, up))


def test_swiglu_public_op_on_cpu_is_reference():
    gate, up, _ = _inputs((2, 7, 13), "cpu")
    assert torch.equal(swiglu(gate, up), swiglu_reference(gate, up))
    with pytest.raises(ValueError, match="same shape and dtype"):
        swiglu(gate, up[..., :5])


def test_swiglu_public_op_forced(device):
    gate, up, _ = _inputs((2, 7, 13), device)
    torch.testing.assert_close(swiglu(gate, up, force_triton=True), swiglu_reference(gate, up))
