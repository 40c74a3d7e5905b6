"""The reference policy without a second copy of the weights: adapters off gives the base's logits exactly
(our LoRA layers and PEFT's), and a swapped-in starting adapter gives that adapter's logits and puts the
current values back."""

from __future__ import annotations

import peft
import pytest
import torch
import transformers

from fasttune.lora.apply import apply_lora
from fasttune.lora.reference import Reference, adapters_off
from fasttune.models.generic import GenericCausalLM
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM

CFG = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2)
IDS = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(0))


def _ours():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    base = model(IDS).logits
    apply_lora(model, r=4, lora_alpha=8, target_modules=["default"])
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.2)
    return model, base


def test_adapters_off_runs_the_base_exactly():
    model, base = _ours()
    adapted = model(IDS).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    with adapters_off(model):
        torch.testing.assert_close(model(IDS).logits, base, rtol=0, atol=0)
    torch.testing.assert_close(model(IDS).logits, adapted, rtol=0, atol=0)  # back on


def test_adapters_off_on_the_generic_peft_path():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=61)
    hf = transformers.GPT2LMHeadModel(config).eval()
    base = hf(IDS).logits
    wrapped = GenericCausalLM(peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["c_attn"],
                                                                      init_lora_weights=False)))
    assert not torch.allclose(wrapped(IDS).logits, base, atol=1e-4)
    with adapters_off(wrapped):
        torch.testing.assert_close(wrapped(IDS).logits, base, rtol=0, atol=1e-6)


def test_reference_swaps_in_the_starting_adapter_and_restores_the_current_one():
    model, _ = _ours()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    start_logits = model(IDS).logits
    reference = Reference(params, params)  # keeps a copy of the values now
    with torch.no_grad():
        for p in params.values():
            p.add_(0.1)
    current = {n: p.detach().clone() for n, p in params.items()}
    with reference(model):
        torch.testing.assert_close(model(IDS).logits, start_logits, rtol=0, atol=0)
    for n, p in params.items():
        assert torch.equal(p, current[n])
    with pytest.raises(ValueError, match="does not match the trainable tensors"):
        Reference(params, {"x": torch.zeros(1)})
