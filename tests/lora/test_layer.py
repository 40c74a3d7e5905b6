"""LoRALinear: the invariants PEFT keeps (B=0 is identity, merged == unmerged, merge idempotent)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fasttune.lora.layer import LoRALinear


def _layer(in_f=13, out_f=7, r=4, alpha=8, bias=True, dtype=torch.float32, **kw) -> LoRALinear:
    torch.manual_seed(0)
    base = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    return LoRALinear(base, r, alpha, **kw)


def _randomise_b(layer: LoRALinear, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g))


def test_b_zero_gives_base_output_and_frozen_base():
    layer = _layer()
    x = torch.randn(3, 5, 13)
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)
    assert not any(p.requires_grad for p in layer.base_layer.parameters())
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    assert torch.count_nonzero(layer.lora_A.weight) > 0


def test_forward_matches_formula_and_scaling():
    layer = _layer(r=4, alpha=8)
    _randomise_b(layer)
    x = torch.randn(2, 13)
    want = layer.base_layer(x) + (x @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 2.0
    torch.testing.assert_close(layer(x), want)
    assert layer.scaling == 2.0
    assert _layer(r=4, alpha=8, use_rslora=True).scaling == pytest.approx(8 / math.sqrt(4))


def test_init_is_seeded_by_generator_and_matches_peft_bound():
    a1 = _layer(generator=torch.Generator().manual_seed(5)).lora_A.weight
    torch.manual_seed(123)  # the global RNG must not matter
    a2 = _layer(generator=torch.Generator().manual_seed(5)).lora_A.weight
    torch.testing.assert_close(a1, a2, rtol=0, atol=0)
    # kaiming_uniform(a=sqrt(5)) bounds values by 1/sqrt(in_features)
    assert a1.abs().max() <= 1 / math.sqrt(13)


def test_merged_equals_unmerged_and_unmerge_restores():
    layer = _layer()
    _randomise_b(layer)
    x = torch.randn(4, 13)
    before = layer(x)
    w0 = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="already merged"):
        layer.merge()  # guarded: a second merge must not add the delta again
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, w0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_gradients_reach_only_the_adapter():
    layer = _layer()
    _randomise_b(layer)
    x = torch.randn(4, 13, requires_grad=True)
    layer(x).square().sum().backward()
    assert layer.lora_A.weight.grad is not None and layer.lora_B.weight.grad is not None
    assert layer.base_layer.weight.grad is None
    assert x.grad is not None


def test_adapter_dtype_and_output_dtype():
    layer = _layer(dtype=torch.bfloat16)
    _randomise_b(layer)
    assert layer.lora_A.weight.dtype == torch.float32  # PEFT keeps adapters in fp32 by default
    x = torch.randn(2, 13, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16
    want = (layer.base_layer(x).float() + (x.float() @ layer.lora_A.weight.T @ layer.lora_B.weight.T) * 2.0)
    torch.testing.assert_close(y, want.to(torch.bfloat16))
    lay16 = _layer(dtype=torch.bfloat16, adapter_dtype=torch.bfloat16)
    assert lay16.lora_B.weight.dtype == torch.bfloat16


def test_dropout_only_on_adapter_path_in_training():
    layer = _layer(dropout=0.5)
    _randomise_b(layer)
    x = torch.randn(64, 13)
    layer.eval()
    y_eval = layer(x)
    layer.train()
    torch.manual_seed(0)
    y_train = layer(x)
    assert not torch.allclose(y_eval, y_train)
    layer.lora_B.weight.data.zero_()
    torch.testing.assert_close(layer(x), layer.base_layer(x), rtol=0, atol=0)  # base path never dropped


def test_quantised_base_refuses_merge():
    # A stand-in with bitsandbytes' class name: the check is by name so bitsandbytes is never imported.
    Linear4bit = type("Linear4bit", (nn.Linear,), {})
    layer = LoRALinear(Linear4bit(8, 8), 2, 4)
    assert layer.quantized
    with pytest.raises(RuntimeError, match="quantised base layer.*Linear4bit"):
        layer.merge()


def test_kernel_seam_calls_fused_op(monkeypatch):
    import fasttune.lora.layer as mod
    seen = {}

    def fake(x, weight, bias, a, b, scaling):
        seen["args"] = (weight, bias, a, b, scaling)
        return torch.zeros(x.shape[:-1] + (weight.shape[0],))

    monkeypatch.setattr(mod, "_fused_lora_linear", lambda: fake)
    layer = _layer()
    x = torch.randn(2, 13)
    assert not torch.equal(layer(x), torch.zeros(2, 7))  # off by default
    layer.use_kernel = True
    assert torch.equal(layer(x), torch.zeros(2, 7))
    assert seen["args"][0] is layer.base_layer.weight and seen["args"][4] == layer.scaling


def test_rejects_non_linear():
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear(nn.Embedding(4, 4), 2, 4)
