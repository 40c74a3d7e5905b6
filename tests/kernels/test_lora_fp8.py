"""LoRA blocks over an FP8 base (a dequantiser carrying `.fp8`, as `models/fp8.py` gives it): the backward's
dx = dy W runs in FP8 for every projection (on the CPU the emulation: dy with W's row scales folded in,
quantised per row to e4m3, times W8 in fp32), and dx and the LoRA gradients stay within FP8's precision of
the same block over the dequantised weight."""

from __future__ import annotations

import pytest
import torch

from fasttune.kernels import lora as lora_kernels
from fasttune.kernels.fp8 import (
    dequantize_fp8,
    fp8_grad_reference,
    quantize_rows_reference,
    quantize_weight_fp8,
)
from fasttune.kernels.lora import LoRAWeights, lora_linear, lora_mlp, lora_qkv

LEAD = (2, 8)  # 16 rows: the GPU runs the FP8 tensor-core path


def _proj(d_in, d_out, r, s, g, device) -> LoRAWeights:
    """A LoRA projection whose base is FP8, with rows of W over a decade of magnitudes."""
    w = torch.randn(d_out, d_in, generator=g) / d_in**0.5 * torch.logspace(-0.5, 0.5, d_out)[:, None]
    w8 = quantize_weight_fp8(w.to(device))

    def dequant() -> torch.Tensor:
        return dequantize_fp8(w8, torch.bfloat16, reuse_buffer=True)

    dequant.fp8 = w8
    return LoRAWeights(dequant, None, (torch.randn(r, d_in, generator=g) / d_in**0.5).to(device),
                       (torch.randn(d_out, r, generator=g) * 0.5).to(device), s)


def _dequantised(p: LoRAWeights) -> LoRAWeights:
    """The same projection over the dense dequantised weight (the reference)."""
    return p._replace(weight=dequantize_fp8(p.weight.fp8, torch.float32))


def _run(fn, x, projs, dys):
    """Outputs, then dx and (dA, dB) per projection, of fn(x, *projs) with output gradients `dys`."""
    x = x.detach().clone().requires_grad_(True)
    ps = [p._replace(lora_A=p.lora_A.detach().clone().requires_grad_(True),
                     lora_B=p.lora_B.detach().clone().requires_grad_(True)) for p in projs]
    outs = fn(x, *ps)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, dys)
    return [o.detach() for o in outs], [x.grad] + [t for p in ps for t in (p.lora_A.grad, p.lora_B.grad)]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _fp8_dx(dy, p: LoRAWeights) -> torch.Tensor:
    """dy W emulated from FP8 operands, plus the adapter's share s (dy B) A, in fp32."""
    dy2 = dy.reshape(-1, dy.shape[-1]).float()
    w8 = p.weight.fp8
    base = fp8_grad_reference(*quantize_rows_reference(dy2, w8.scale), w8, torch.float32)
    return base + p.scaling * (dy2 @ p.lora_B) @ p.lora_A


@pytest.fixture
def grad_calls(monkeypatch):
    """Counts the FP8 input-gradient products the blocks run."""
    calls = []
    real = lora_kernels.fp8_grad_input

    def counted(dy2, w, dt):
        calls.append(tuple(w.data.shape))
        return real(dy2, w, dt)

    monkeypatch.setattr(lora_kernels, "fp8_grad_input", counted)
    return calls


def _check_dx(dx, expect, device):
    top = expect.abs().max().item()
    if device == "cpu":  # the emulation: the same arithmetic as `_fp8_dx`, up to summation order
        torch.testing.assert_close(dx, expect.view(dx.shape), rtol=1e-5, atol=1e-5 * top)
    else:  # FP8 tensor cores write bf16
        torch.testing.assert_close(dx, expect.view(dx.shape), rtol=2 ** -6, atol=1e-2 * top)


def test_lora_linear_dx_runs_in_fp8(any_device, grad_calls):
    g = torch.Generator().manual_seed(0)
    p = _proj(32, 48, 4, 2.0, g, any_device)
    x = torch.randn(*LEAD, 32, generator=g).to(any_device)
    dy = torch.randn(*LEAD, 48, generator=g).to(any_device)
    (y,), grads = _run(lambda x, p: lora_linear(x, *p), x, [p], [dy])
    assert grad_calls == [(48, 32)]
    _check_dx(grads[0], _fp8_dx(dy, p), any_device)
    (y_ref,), ref = _run(lambda x, p: lora_linear(x, *p), x, [_dequantised(p)], [dy])
    rel = _rel(grads[0], ref[0])
    assert 1e-4 < rel < 0.06, rel  # FP8-rounded dy: near the product with the dequantised weight, not it
    for got, want in zip(grads[1:], ref[1:]):  # the adapters' gradients do not read the base
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_lora_qkv_dx_runs_in_fp8(any_device, grad_calls):
    g = torch.Generator().manual_seed(1)
    projs = [_proj(32, d, 4, s, g, any_device) for d, s in ((32, 0.5), (16, 1.0), (16, 2.0))]
    x = torch.randn(*LEAD, 32, generator=g).to(any_device)
    dys = [torch.randn(*LEAD, p.lora_B.shape[0], generator=g).to(any_device) for p in projs]
    _, grads = _run(lora_qkv, x, projs, dys)
    assert grad_calls == [(32, 32), (16, 32), (16, 32)]
    _check_dx(grads[0], sum(_fp8_dx(dy, p) for dy, p in zip(dys, projs)), any_device)
    _, ref = _run(lora_qkv, x, [_dequantised(p) for p in projs], dys)
    rel = _rel(grads[0], ref[0])
    assert 1e-4 < rel < 0.06, rel
    for got, want in zip(grads[1:], ref[1:]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _mlp_case(device, seed=2):
    g = torch.Generator().manual_seed(seed)
    projs = [_proj(32, 48, 4, 0.5, g, device), _proj(32, 48, 4, 2.0, g, device),
             _proj(48, 32, 4, 1.0, g, device)]  # gate, up, down
    x = torch.randn(*LEAD, 32, generator=g).to(device)
    dy = torch.randn(*LEAD, 32, generator=g).to(device)
    return x, projs, dy


MLP_NAMES = ["dx", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down", "dB_down"]


def _check_mlp(triton: bool | None, device, grad_calls):
    x, projs, dy = _mlp_case(device)
    fn = lambda x, *ps: lora_mlp(x, *ps, force_triton=triton)  # noqa: E731
    (y,), grads = _run(fn, x, projs, [dy])
    assert grad_calls == [(32, 48), (48, 32), (48, 32)]  # down, then gate and up
    (y_ref,), ref = _run(fn, x, [_dequantised(p) for p in projs], [dy])
    assert _rel(y, y_ref) < 0.08
    for got, want, name in zip(grads, ref, MLP_NAMES):  # forward and backward products in FP8
        assert _rel(got, want) < 0.1, name
    assert _rel(grads[0], ref[0]) > 1e-4


def test_lora_mlp_torch_path_runs_dx_in_fp8(any_device, grad_calls):
    _check_mlp(False, any_device, grad_calls)


def test_lora_mlp_triton_path_runs_dx_in_fp8(device, grad_calls):
    _check_mlp(True, device, grad_calls)


def test_dense_and_nf4_bases_keep_their_products(any_device, grad_calls):
    """Without `.fp8` the dx products are the dense ones: nothing runs through the FP8 path."""
    x, projs, dy = _mlp_case(any_device, seed=3)
    dense = [_dequantised(p) for p in projs]
    _run(lambda x, *ps: lora_mlp(x, *ps, force_triton=False), x, dense, [dy])
    _run(lora_qkv, x, dense[:2] + [dense[0]], [torch.ones(*LEAD, 48, device=any_device)] * 3)
    assert grad_calls == []
