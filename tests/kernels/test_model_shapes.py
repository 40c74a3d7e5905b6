"""Every Triton kernel on one SmolLM2-135M-sized layer (hidden 576, 9 heads / 3 kv heads of 64, MLP 1536),
interpreted on the CPU: the tiny-shape tests' conclusions hold at a real model's shapes."""

from __future__ import annotations

import pytest
import torch
from kernel_checks import assert_fp32_close

from fasttune.kernels.cross_entropy import linear_cross_entropy, linear_cross_entropy_reference
from fasttune.kernels.nf4 import dequantize_nf4, dequantize_nf4_reference, quantize_nf4
from fasttune.kernels.rms_norm import RMSNormFunction, rms_norm_reference
from fasttune.kernels.rope import RoPEFunction, apply_rope_reference
from fasttune.kernels.swiglu import SwiGLUFunction, swiglu_reference

B, T, HIDDEN, NH, NKV, HD, INTER, VOCAB = 1, 48, 576, 9, 3, 64, 1536, 4099


def _grads(fn, *inputs, dy):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    torch.autograd.backward(outs, dy)
    return [o.detach() for o in outs] + [t.grad for t in leaves]


@pytest.mark.slow
def test_kernels_at_smollm2_shapes(device):
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g).to(device)

    x, w = rnd(B, T, HIDDEN), rnd(HIDDEN)
    dy = rnd(B, T, HIDDEN)
    kern = _grads(lambda a, b: RMSNormFunction.apply(a, b, 1e-5), x, w, dy=dy)
    exact = _grads(lambda a, b: rms_norm_reference(a, b, 1e-5), x.double(), w.double(), dy=dy.double())
    for k, e in zip(kern, exact):
        assert_fp32_close(k, e, "rms_norm", rtol=2e-5)

    q, k_, pos = rnd(B, T, NH, HD), rnd(B, T, NKV, HD), torch.arange(T, dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, HD, 2).float() / HD))
    emb = torch.cat(((pos[:, None] * inv),) * 2, -1)[None].to(device)  # (1, T, HD)
    dys = (rnd(B, T, NH, HD), rnd(B, T, NKV, HD))
    kern = _grads(lambda a, b: RoPEFunction.apply(a, b, emb.cos(), emb.sin()), q, k_, dy=dys)
    exact = _grads(lambda a, b: apply_rope_reference(a, b, emb.cos().double(), emb.sin().double()),
                   q.double(), k_.double(), dy=tuple(d.double() for d in dys))
    for a, e in zip(kern, exact):
        assert_fp32_close(a, e, "rope")

    gate, up, dh = rnd(B, T, INTER) * 3, rnd(B, T, INTER), rnd(B, T, INTER)
    kern = _grads(SwiGLUFunction.apply, gate, up, dy=dh)
    exact = _grads(swiglu_reference, gate.double(), up.double(), dy=dh.double())
    for a, e in zip(kern, exact):
        assert_fp32_close(a, e, "swiglu")

    nf4 = quantize_nf4(rnd(INTER, HIDDEN).bfloat16(), nested=True)
    assert torch.equal(dequantize_nf4(nf4, force_triton=True), dequantize_nf4_reference(nf4))

    h, head = rnd(B * T, HIDDEN), rnd(VOCAB, HIDDEN) / HIDDEN**0.5
    y = torch.randint(0, VOCAB, (B * T,), generator=g).to(device)
    y[::5] = -100
    kern = _grads(lambda a, b: linear_cross_entropy(a, b, y, chunk_rows=16, force_triton=True)[0], h, head,
                  dy=torch.tensor(1.0, device=device))
    exact = _grads(lambda a, b: linear_cross_entropy_reference(a, b, y)[0], h.double(), head.double(),
                   dy=torch.tensor(1.0, dtype=torch.float64, device=device))
    for a, e in zip(kern, exact):
        assert_fp32_close(a, e, "linear_cross_entropy", rtol=2e-5)
