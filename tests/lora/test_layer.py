"""LoRALinear: the invariants PEFT keeps (B=0 is identity, merged == unmerged, merge idempotent)."""

from __future__ import annotations

import math
import types

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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_kernel_path_matches_reference_forward_and_backward(dropout):
    layer = _layer(in_f=13, out_f=7, r=4, dropout=dropout)
    _randomise_b(layer)
    layer.train()
    x = torch.randn(3, 5, 13)
    outs, grads = [], []
    for use_kernels in (False, True):
        layer.use_kernels = use_kernels
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the same dropout mask on both paths
        y = layer(xi)
        assert ("LoRALinearFunction" in type(y.grad_fn).__name__) == use_kernels
        y.backward(torch.ones_like(y))
        outs.append(y)
        grads.append((xi.grad, layer.lora_A.weight.grad.clone(), layer.lora_B.weight.grad.clone()))
        layer.zero_grad()
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for g_kernel, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_kernel, g_ref, rtol=1e-5, atol=1e-5)
    assert layer.base_layer.weight.grad is None


def test_use_kernels_alias_follows_the_models_switch():
    layer = _layer()
    model = nn.Sequential(layer)
    for m in model.modules():  # what LlamaForCausalLM.set_use_kernels does
        if hasattr(m, "use_kernels"):
            m.use_kernels = True
    assert layer.use_kernels is True


def test_nf4_base_reaches_the_kernel_as_a_dequantiser():
    """A stand-in for bitsandbytes' Linear4bit (same class name, packed weight + quant_state)."""
    from fasttune.kernels.nf4 import dequantize_nf4_reference, quantize_nf4

    dense = nn.Linear(64, 32, bias=False)
    q = quantize_nf4(dense.weight.detach(), blocksize=64)
    state = types.SimpleNamespace(quant_type="nf4", absmax=q.absmax, shape=torch.Size(q.shape),
                                  dtype=torch.float32, blocksize=64, code=q.code, nested=False)

    class Linear4bit(nn.Linear):
        def forward(self, x):
            return x @ dequantize_nf4_reference(q).T

    base = Linear4bit(64, 32, bias=False)
    base.weight = nn.Parameter(q.packed, requires_grad=False)
    base.weight.quant_state = state
    layer = LoRALinear(base, 4, 8)
    _randomise_b(layer)
    assert callable(layer.kernel_weight())
    x = torch.randn(5, 64)
    want = layer(x)
    layer.use_kernels = True
    got = layer(x)
    assert "LoRALinearFunction" in type(got.grad_fn).__name__
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_nf4_dequantiser_is_made_once_and_again_where_the_weight_changed():
    """The dequantiser of bitsandbytes' own parameter is reused across calls; `.to()` drops it, a weight
    with other bytes or scales gets a new one that reads them, and a gathered FSDP2 weight (a plain tensor,
    the state on the module) is never kept."""
    from fasttune.kernels.nf4 import dequantize_nf4_reference, quantize_nf4
    from fasttune.lora import layer as layer_module

    def state_of(q):
        return types.SimpleNamespace(quant_type="nf4", absmax=q.absmax, shape=torch.Size(q.shape),
                                     dtype=torch.float32, blocksize=64, code=q.code, nested=False)

    q1, q2 = (quantize_nf4(torch.randn(32, 64, generator=torch.Generator().manual_seed(s))) for s in (1, 2))

    class Linear4bit(nn.Linear):
        pass

    base = Linear4bit(64, 32, bias=False)
    base.weight = nn.Parameter(q1.packed.clone(), requires_grad=False)
    base.weight.quant_state = state_of(q1)
    layer = LoRALinear(base, 4, 8)
    first = layer.kernel_weight()
    assert layer.kernel_weight() is first
    torch.testing.assert_close(first(), dequantize_nf4_reference(q1), rtol=0, atol=0)
    layer.to("cpu")
    again = layer.kernel_weight()
    assert again is not first and layer.kernel_weight() is again
    # new bytes and scales in place of the old: the dequantiser made for them reads them
    base.weight.data = q2.packed.clone()
    base.weight.quant_state = state_of(q2)
    torch.testing.assert_close(layer.kernel_weight()(), dequantize_nf4_reference(q2), rtol=0, atol=0)
    assert layer in layer_module._NF4_DEQUANTISERS
    # FSDP2's gathered weight: a plain tensor, the quantisation state on the module
    base.quant_state = base.weight.quant_state
    base.weight = nn.Parameter(q2.packed.clone(), requires_grad=False)
    one, two = layer.kernel_weight(), layer.kernel_weight()
    assert one is not two and layer not in layer_module._NF4_DEQUANTISERS
    torch.testing.assert_close(one(), dequantize_nf4_reference(q2), rtol=0, atol=0)


def test_rejects_non_linear():
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear(nn.Embedding(4, 4), 2, 4)
