"""LoRA linear and LoRA MLP autograd Functions vs their references: outputs and gradients, frozen base."""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from kernel_checks import assert_bf16_close, assert_fp32_close

from fasttune.kernels import lora as lora_kernels
from fasttune.kernels.lora import (
    LoRAWeights,
    lora_linear,
    lora_linear_reference,
    lora_mlp,
    lora_mlp_reference,
    lora_qkv,
    lora_qkv_reference,
)
from fasttune.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference, quantize_nf4
from fasttune.memory.layer_pass import LayerPass

# (leading shape, in, out, r)
SHAPES = [((1, 1), 7, 5, 1), ((2, 5), 13, 11, 4), ((3,), 32, 48, 8)]


def _params(lead, d_in, d_out, r, device, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d_in, generator=g)
    w = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    b = torch.randn(d_out, generator=g) if bias else None
    a = torch.randn(r, d_in, generator=g) / d_in**0.5
    bb = torch.randn(d_out, r, generator=g)  # non-zero, so every gradient path is exercised
    dy = torch.randn(*lead, d_out, generator=g)
    return [None if t is None else t.to(device) for t in (x, w, b, a, bb, dy)]


def _run(fn, x, w, b, a, bb, dy, s, x_lora_mask=None, train_base=False):
    """Output and gradients (x, A, B[, W, bias]) of fn(x, w, b, a, bb, s[, x_lora])."""
    x = x.detach().clone().requires_grad_(True)
    a = a.detach().clone().requires_grad_(True)
    bb = bb.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(train_base)
    b = None if b is None else b.detach().clone().requires_grad_(train_base)
    extra = () if x_lora_mask is None else (x * x_lora_mask,)
    y = fn(x, w, b, a, bb, s, *extra)
    y.backward(dy.to(y.dtype))
    out = [y.detach(), x.grad, a.grad, bb.grad]
    if train_base:
        out += [w.grad] + ([] if b is None else [b.grad])
    else:
        assert w.grad is None and (b is None or b.grad is None)
    return out


@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_lora_linear_fp32(any_device, shape, dropout):
    x, w, b, a, bb, dy = _params(*shape, any_device)
    mask = (torch.rand(x.shape, generator=torch.Generator().manual_seed(9)) > 0.3).to(x) / 0.7 \
        if dropout else None
    kern = _run(lora_linear, x, w, b, a, bb, dy, 0.5, mask)
    exact = _run(lora_linear_reference, *[t.double() for t in (x, w, b, a, bb, dy)], 0.5,
                 None if mask is None else mask.double())
    for k, e, what in zip(kern, exact, ["y", "dx", "dA", "dB"]):
        assert k.dtype == torch.float32
        assert_fp32_close(k, e, f"lora_linear {what} {shape}")


@pytest.mark.parametrize("shape", SHAPES)
def test_lora_linear_bf16_with_fp32_adapters(any_device, shape):
    # PEFT keeps adapters in fp32 on a bf16 base: products run in bf16, gradients come back in fp32.
    x, w, b, a, bb, dy = _params(*shape, any_device, seed=1)
    xb, wb, bbias, dyb = x.bfloat16(), w.bfloat16(), b.bfloat16(), dy.bfloat16()
    kern = _run(lora_linear, xb, wb, bbias, a, bb, dyb, 2.0)
    eager = _run(lora_linear_reference, xb, wb, bbias, a.bfloat16(), bb.bfloat16(), dyb, 2.0)
    exact = _run(lora_linear_reference, *[t.double() for t in (xb, wb, bbias, a, bb, dyb)], 2.0)
    assert kern[0].dtype == kern[1].dtype == torch.bfloat16
    assert kern[2].dtype == kern[3].dtype == torch.float32
    for k, e, x64, what in zip(kern, eager, exact, ["y", "dx", "dA", "dB"]):
        assert_bf16_close(k, e, x64, f"lora_linear {what} {shape}")


def test_lora_linear_trainable_base_gets_its_gradients(any_device):
    x, w, b, a, bb, dy = _params((2, 3), 9, 6, 2, any_device, seed=2)
    kern = _run(lora_linear, x, w, b, a, bb, dy, 1.5, train_base=True)
    exact = _run(lora_linear_reference, *[t.double() for t in (x, w, b, a, bb, dy)], 1.5, train_base=True)
    for k, e, what in zip(kern, exact, ["y", "dx", "dA", "dB", "dW", "dbias"]):
        assert_fp32_close(k, e, f"lora_linear {what}")


def test_lora_linear_dequant_callable_is_called_once_per_pass(any_device):
    x, w, _, a, bb, dy = _params((4,), 8, 6, 2, any_device, seed=3, bias=False)
    calls = []

    def dequant():
        calls.append(1)
        return w

    x = x.requires_grad_(True)
    y = lora_linear(x, dequant, None, a.requires_grad_(True), bb, 0.25)
    assert len(calls) == 1
    y.backward(dy)
    assert len(calls) == 2
    torch.testing.assert_close(y, lora_linear_reference(x, w, None, a, bb, 0.25))
    xr = x.detach().clone().requires_grad_(True)
    lora_linear_reference(xr, w, None, a, bb, 0.25).backward(dy)
    torch.testing.assert_close(x.grad, xr.grad)


def test_lora_linear_zero_B_is_the_base_layer(any_device):
    x, w, b, a, bb, _ = _params((2, 5), 13, 11, 4, any_device)
    torch.testing.assert_close(lora_linear(x, w, b, a, torch.zeros_like(bb), 2.0), F.linear(x, w, b))


def test_lora_linear_saves_no_copy_of_the_frozen_base(any_device):
    # Only x, x A^T, A, B and the (frozen) weight itself may be saved, the weight without a copy.
    x, w, b, a, bb, _ = _params((3, 4), 16, 24, 2, any_device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_linear(x.requires_grad_(True), w, b, a.requires_grad_(True), bb.requires_grad_(True), 1.0)
    shapes = sorted(tuple(t.shape) for t in saved)
    assert shapes == sorted([(12, 16), (12, 2), (24, 16), (2, 16), (24, 2)])
    assert any(t.data_ptr() == w.data_ptr() for t in saved)


def test_lora_linear_shape_errors():
    x, w, b, a, bb, _ = _params((2,), 8, 6, 2, "cpu")
    with pytest.raises(ValueError, match="lora_linear: weight"):
        lora_linear(x, w[:, :5], b, a, bb, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        lora_linear(x, w, b, a[:, :5], bb, 1.0)
    with pytest.raises(ValueError, match="outputs of 6"):
        lora_linear(x, w, b, a, bb[:5], 1.0)


def _mlp_params(lead, hidden, inter, r, device, seed, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)

    def proj(d_in, d_out, s):
        return LoRAWeights(
            (torch.randn(d_out, d_in, generator=g) / d_in**0.5).to(device, dtype),
            (torch.randn(d_out, generator=g).to(device, dtype) if bias else None),
            (torch.randn(r, d_in, generator=g) / d_in**0.5).to(device),
            torch.randn(d_out, r, generator=g).to(device), s)

    x = torch.randn(*lead, hidden, generator=g).to(device, dtype)
    dy = torch.randn(*lead, hidden, generator=g).to(device, dtype)
    return x, proj(hidden, inter, 0.5), proj(hidden, inter, 2.0), proj(inter, hidden, 1.0), dy


def _run_mlp(fn, x, gate, up, down, dy):
    x = x.detach().clone().requires_grad_(True)
    ps = [p._replace(lora_A=p.lora_A.detach().clone().requires_grad_(True),
                     lora_B=p.lora_B.detach().clone().requires_grad_(True)) for p in (gate, up, down)]
    y = fn(x, *ps)
    y.backward(dy.to(y.dtype))
    return [y.detach(), x.grad] + [t for p in ps for t in (p.lora_A.grad, p.lora_B.grad)]


def _double(p: LoRAWeights) -> LoRAWeights:
    return LoRAWeights(*[t.double() if isinstance(t, torch.Tensor) else t for t in p])


MLP_NAMES = ["y", "dx", "dA_gate", "dB_gate", "dA_up", "dB_up", "dA_down", "dB_down"]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("lead", [(1, 1), (2, 3)])
def test_lora_mlp_torch_path_fp32(any_device, lead, bias):
    x, gate, up, down, dy = _mlp_params(lead, 12, 20, 3, any_device, seed=4, bias=bias)
    kern = _run_mlp(lambda *a: lora_mlp(*a, force_triton=False), x, gate, up, down, dy)
    exact = _run_mlp(lora_mlp_reference, x.double(), *map(_double, (gate, up, down)), dy.double())
    for k, e, what in zip(kern, exact, MLP_NAMES):
        assert_fp32_close(k, e, f"lora_mlp {what}")


def test_lora_mlp_triton_swiglu(device):
    x, gate, up, down, dy = _mlp_params((2, 3), 12, 20, 3, device, seed=5)
    kern = _run_mlp(lambda *a: lora_mlp(*a, force_triton=True), x, gate, up, down, dy)
    exact = _run_mlp(lora_mlp_reference, x.double(), *map(_double, (gate, up, down)), dy.double())
    for k, e, what in zip(kern, exact, MLP_NAMES):
        assert_fp32_close(k, e, f"lora_mlp {what}")


@pytest.mark.parametrize("defer_upto", [0, 32])  # 0: every rank adds its gate/up terms in the products
@pytest.mark.parametrize("bf16", [False, True])
def test_lora_mlp_gate_up_terms_in_the_kernel_or_in_the_products(device, defer_upto, bf16, monkeypatch):
    """Ranks up to DEFERRED_MAX_RANK leave the gate/up adapter terms to the SwiGLU kernels, larger ones
    add them in the products' epilogue: both give the reference's output and gradients."""
    monkeypatch.setattr(lora_kernels, "DEFERRED_MAX_RANK", defer_upto)
    dtype = torch.bfloat16 if bf16 else torch.float32
    x, gate, up, down, dy = _mlp_params((2, 7), 16, 40, 5, device, seed=10, dtype=dtype)
    kern = _run_mlp(lambda *a: lora_mlp(*a, force_triton=True), x, gate, up, down, dy)
    exact = _run_mlp(lora_mlp_reference, x.double(), *map(_double, (gate, up, down)), dy.double())
    if not bf16:
        for k, e, what in zip(kern, exact, MLP_NAMES):
            assert_fp32_close(k, e, f"lora_mlp {what} (deferred up to rank {defer_upto})")
        return
    low = [p._replace(lora_A=p.lora_A.bfloat16(), lora_B=p.lora_B.bfloat16()) for p in (gate, up, down)]
    eager = _run_mlp(lora_mlp_reference, x, *low, dy)
    for k, e, x64, what in zip(kern, eager, exact, MLP_NAMES):
        assert_bf16_close(k, e, x64, f"lora_mlp {what} (deferred up to rank {defer_upto})")


def test_lora_mlp_bf16(any_device):
    x, gate, up, down, dy = _mlp_params((3, 5), 16, 40, 4, any_device, seed=6, dtype=torch.bfloat16)
    kern = _run_mlp(lambda *a: lora_mlp(*a, force_triton=False), x, gate, up, down, dy)
    bf16 = [p._replace(lora_A=p.lora_A.bfloat16(), lora_B=p.lora_B.bfloat16()) for p in (gate, up, down)]
    eager = _run_mlp(lora_mlp_reference, x, *bf16, dy)
    exact = _run_mlp(lora_mlp_reference, x.double(), *map(_double, (gate, up, down)), dy.double())
    for k, e, x64, what in zip(kern, eager, exact, MLP_NAMES):
        assert_bf16_close(k, e, x64, f"lora_mlp {what}")


def test_lora_mlp_does_not_save_the_swiglu_output(any_device):
    lead, hidden, inter = (2, 3), 12, 20
    x, gate, up, down, _ = _mlp_params(lead, hidden, inter, 3, any_device, seed=7)
    saved = []
    ps = [p._replace(lora_A=p.lora_A.requires_grad_(True)) for p in (gate, up, down)]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        lora_mlp(x, *ps, force_triton=False)
    assert sum(tuple(t.shape) == (6, inter) for t in saved) == 2  # gate(x) and up(x), not silu(g) u


def test_lora_mlp_backward_runs_once_per_forward(device):
    """The backward writes its gradients over the saved g, u: a second pass must fail loudly, not be wrong."""
    x, gate, up, down, dy = _mlp_params((2, 3), 12, 20, 3, device, seed=9)
    ps = [p._replace(lora_A=p.lora_A.requires_grad_(True)) for p in (gate, up, down)]
    y = lora_mlp(x, *ps, force_triton=True)
    y.backward(dy, retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        y.backward(dy)


def test_lora_mlp_with_nf4_bases_sharing_one_buffer(any_device):
    # Three dequantisers write into the same shared buffer: each must be used before the next one runs.
    x, gate, up, down, dy = _mlp_params((2, 3), 64, 128, 4, any_device, seed=8)
    q = {name: quantize_nf4(p.weight) for name, p in (("g", gate), ("u", up), ("d", down))}
    dense = {name: dequantize_nf4_reference(w) for name, w in q.items()}
    quantised = [p._replace(weight=lambda w=q[k]: dequantize_nf4(w, reuse_buffer=True))
                 for k, p in zip("gud", (gate, up, down))]
    kern = _run_mlp(lambda *a: lora_mlp(*a, force_triton=False), x, *quantised, dy)
    exact = _run_mlp(lora_mlp_reference, x.double(),
                     *[_double(p._replace(weight=dense[k])) for k, p in zip("gud", (gate, up, down))],
                     dy.double())
    for k, e, what in zip(kern, exact, MLP_NAMES):
        assert_fp32_close(k, e, f"lora_mlp nf4 {what}")


def test_lora_mlp_recompute_holds_its_own_gate_weight_for_the_backward(any_device):
    """A recompute for the backward dequantises the gate weight once, into a tensor of its own (`fresh`),
    and its backward's dx product uses it; up is dequantised into the shared buffer for each product (one
    held dense copy at the backward's peak, not two); a plain forward/backward dequantises every weight into
    the shared buffer in each pass. Gradients are those of the plain pass."""
    x, gate, up, down, dy = _mlp_params((2, 3), 64, 128, 4, any_device, seed=10)
    q = {name: quantize_nf4(p.weight) for name, p in (("g", gate), ("u", up), ("d", down))}
    calls = collections.Counter()

    def dequantiser(k):
        def dequant():
            calls[f"{k} shared"] += 1
            return dequantize_nf4(q[k], reuse_buffer=True)

        def fresh():
            calls[f"{k} fresh"] += 1
            return dequantize_nf4(q[k])

        dequant.fresh = fresh
        return dequant

    quantised = [p._replace(weight=dequantiser(k)) for k, p in zip("gud", (gate, up, down))]
    plain = _run_mlp(lambda *a: lora_mlp(*a, force_triton=False), x, *quantised, dy)
    assert calls == {"g shared": 2, "u shared": 2, "d shared": 2}
    calls.clear()

    def recompute(*a):
        return lora_mlp(*a, force_triton=False, layer_pass=LayerPass(rerun=True))

    rerun = _run_mlp(recompute, x, *quantised, dy)
    assert calls == {"g fresh": 1, "u shared": 2, "d shared": 1}  # down's product is skipped in the rerun
    for got, want, what in zip(rerun[1:], plain[1:], MLP_NAMES[1:]):
        torch.testing.assert_close(got, want, msg=lambda m, w=what: f"{w}: {m}")


def _qkv_params(lead, hidden, n_q, n_kv, r, device, seed, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)

    def proj(d_out, s):
        return LoRAWeights(
            (torch.randn(d_out, hidden, generator=g) / hidden**0.5).to(device, dtype),
            (torch.randn(d_out, generator=g).to(device, dtype) if bias else None),
            (torch.randn(r, hidden, generator=g) / hidden**0.5).to(device),
            torch.randn(d_out, r, generator=g).to(device), s)

    x = torch.randn(*lead, hidden, generator=g).to(device, dtype)
    dys = [torch.randn(*lead, d, generator=g).to(device, dtype) for d in (n_q, n_kv, n_kv)]
    return x, (proj(n_q, 0.5), proj(n_kv, 1.0), proj(n_kv, 2.0)), dys


def _run_qkv(fn, x, projs, dys, use=(True, True, True)):
    x = x.detach().clone().requires_grad_(True)
    ps = [p._replace(lora_A=p.lora_A.detach().clone().requires_grad_(True),
                     lora_B=p.lora_B.detach().clone().requires_grad_(True)) for p in projs]
    outs = fn(x, *ps)
    torch.autograd.backward([o for o, u in zip(outs, use) if u],
                            [d.to(o.dtype) for o, d, u in zip(outs, dys, use) if u])
    grads = [t if t is not None else torch.zeros_like(p.lora_A if i % 2 == 0 else p.lora_B)
             for p in ps for i, t in enumerate((p.lora_A.grad, p.lora_B.grad))]
    return [o.detach() for o in outs] + [x.grad] + grads


QKV_NAMES = ["q", "k", "v", "dx", "dA_q", "dB_q", "dA_k", "dB_k", "dA_v", "dB_v"]


@pytest.mark.parametrize("use", [(True, True, True), (True, False, True)])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_qkv_fp32(any_device, bias, use):
    # GQA shapes (k, v narrower than q), qkv bias as in Qwen2, and an output that takes no gradient.
    x, projs, dys = _qkv_params((2, 3), 16, 24, 8, 4, any_device, seed=10, bias=bias)
    kern = _run_qkv(lora_qkv, x, projs, dys, use)
    exact = _run_qkv(lora_qkv_reference, x.double(), [_double(p) for p in projs], [d.double() for d in dys],
                     use)
    for k, e, what in zip(kern, exact, QKV_NAMES):
        assert_fp32_close(k, e, f"lora_qkv {what}")


def test_lora_qkv_bf16(any_device):
    x, projs, dys = _qkv_params((3, 5), 32, 32, 16, 4, any_device, seed=11, dtype=torch.bfloat16)
    kern = _run_qkv(lora_qkv, x, projs, dys)
    bf16 = [p._replace(lora_A=p.lora_A.bfloat16(), lora_B=p.lora_B.bfloat16()) for p in projs]
    eager = _run_qkv(lora_qkv_reference, x, bf16, dys)
    exact = _run_qkv(lora_qkv_reference, x.double(), [_double(p) for p in projs], [d.double() for d in dys])
    for k, e, x64, what in zip(kern, eager, exact, QKV_NAMES):
        assert_bf16_close(k, e, x64, f"lora_qkv {what}")


def test_lora_qkv_with_nf4_bases_and_one_saved_x(any_device):
    x, projs, dys = _qkv_params((4,), 64, 64, 32, 2, any_device, seed=12)
    q = [quantize_nf4(p.weight) for p in projs]
    quantised = [p._replace(weight=lambda w=w: dequantize_nf4(w, reuse_buffer=True))
                 for p, w in zip(projs, q)]
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        kern = _run_qkv(lora_qkv, x, quantised, dys)
    assert sum(tuple(t.shape) == (4, 64) for t in saved) == 1  # x, once; no dense weight kept
    dense = [_double(p._replace(weight=dequantize_nf4_reference(w))) for p, w in zip(projs, q)]
    exact = _run_qkv(lora_qkv_reference, x.double(), dense, [d.double() for d in dys])
    for k, e, what in zip(kern, exact, QKV_NAMES):
        assert_fp32_close(k, e, f"lora_qkv nf4 {what}")


def test_residual_is_added_in_the_product_in_the_compute_dtype_and_after_it_otherwise(monkeypatch):
    g = torch.Generator().manual_seed(3)
    x, w, a, b = (torch.randn(*s, generator=g) for s in ((2, 3, 8), (32, 8), (4, 8), (32, 4)))
    residual = torch.randn(2, 3, 32, generator=g)
    firsts = []
    real = lora_kernels._forward

    def forward(*args, residual=None, **kw):
        firsts.append(residual)
        return real(*args, residual=residual, **kw)

    monkeypatch.setattr(lora_kernels, "_forward", forward)
    with torch.no_grad():
        plain = lora_kernels.lora_linear(x, w, None, a, b, 0.5)
        y = lora_kernels.lora_linear(x, w, None, a, b, 0.5, layer_pass=LayerPass(residual=residual))
        torch.testing.assert_close(y, residual + plain)
        wide = lora_kernels.lora_linear(x, w, None, a, b, 0.5,
                                        layer_pass=LayerPass(residual=residual.double()))
        assert wide.dtype == torch.float64 and torch.equal(wide, residual.double() + plain)  # added after
    assert firsts[0] is None and firsts[1] is not None and firsts[2] is None  # written first in the product
    with pytest.raises(RuntimeError, match="no_grad"):
        lora_kernels.lora_linear(x, w, None, a, b, 0.5, layer_pass=LayerPass(residual=residual))


def test_adapter_gradients_come_in_the_parameters_dtype_unrounded(any_device):
    # dA and dB of fp32 adapters under bf16 compute: on CUDA one product writes fp32 from its fp32 sums (no
    # bf16 rounding, no cast), elsewhere the bf16 product is cast; scaled by s in both, and at s = 1 untouched
    g = torch.Generator().manual_seed(3)
    a = torch.randn(16, 300, generator=g).to(any_device, torch.bfloat16)
    b = torch.randn(300, 24, generator=g).to(any_device, torch.bfloat16)
    exact = a.double() @ b.double()
    for s in (1.0, 0.5):
        got = lora_kernels._grad_product(a, b, s, torch.float32)
        assert got.dtype == torch.float32 and got.shape == (16, 24)
        err = (got.double() - s * exact).abs().max() / (s * exact).abs().max()
        # bf16 rounding of the output alone is ~2^-9 of the largest value; fp32 sums are far below it
        assert err < (1e-5 if any_device == "cuda" else 1e-2), (s, float(err))
    assert lora_kernels._grad_product(a, b, 1.0, torch.bfloat16).dtype == torch.bfloat16
