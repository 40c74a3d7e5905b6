"""apply_lora: which layers get adapters, freezing, seeded init, errors that name the target."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from fasttune.lora.apply import apply_lora, count_parameters, lora_modules, lora_parameters, resolve_targets
from fasttune.lora.layer import LoRALinear


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))


class _MLP(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, 2 * d, bias=False), nn.Linear(d, 2 * d, bias=False)
        self.down_proj = nn.Linear(2 * d, d, bias=False)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn, self.mlp = _Attn(d), _MLP(d)
        self.router = nn.Linear(d, 3)  # a linear layer outside the default seven


class _Toy(nn.Module):
    """Llama-shaped names without the maths: enough to test which modules are targeted."""

    def __init__(self, d=8, n=2, vocab=11):
        super().__init__()
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(vocab, d)
        self.model.layers = nn.ModuleList(_Block(d) for _ in range(n))
        self.lm_head = nn.Linear(d, vocab, bias=False)


SEVEN = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_default_targets_the_seven_projections_and_freezes_the_rest():
    model = _Toy()
    names = apply_lora(model, r=4, lora_alpha=8)
    assert len(names) == 2 * 7
    assert {n.rsplit(".", 1)[-1] for n in names} == SEVEN
    assert isinstance(model.model.layers[1].mlp.down_proj, LoRALinear)
    assert isinstance(model.model.layers[0].router, nn.Linear) and not isinstance(model.lm_head, LoRALinear)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * 14
    assert "model.layers.0.self_attn.q_proj.lora_A.weight" in trainable
    assert len(lora_parameters(model)) == 2 * 14


def test_all_linear_skips_lm_head_and_explicit_names():
    model = _Toy()
    names = apply_lora(model, 2, 2, target_modules=["all-linear"])
    assert len(names) == 2 * 8 and "lm_head" not in names
    names = apply_lora(_Toy(), 2, 2, target_modules=["q_proj", "mlp.up_proj"])
    assert names == ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
                     "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"]


def test_unknown_target_names_it_and_lists_available():
    with pytest.raises(ValueError, match=r"unknown target_modules \['qkv'\].*q_proj.*router"):
        resolve_targets(_Toy(), ["q_proj", "qkv"])
    model = _Toy()
    apply_lora(model, 2, 2)
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, 2, 2)


def test_init_is_deterministic_whatever_the_global_rng():
    m1, m2, m3 = _Toy(), _Toy(), _Toy()
    torch.manual_seed(1)
    apply_lora(m1, 4, 8, random_state=3407)
    torch.manual_seed(999)
    apply_lora(m2, 4, 8, random_state=3407)
    apply_lora(m3, 4, 8, random_state=7)
    a1, a2, a3 = lora_parameters(m1), lora_parameters(m2), lora_parameters(m3)
    assert all(torch.equal(x, y) for x, y in zip(a1, a2))
    assert not torch.equal(a1[0], a3[0])
    # different layers get different draws from the one generator
    assert not torch.equal(a1[0], a1[2])


def test_count_parameters():
    model = _Toy(d=8, n=2)
    _, total_before = count_parameters(model)
    apply_lora(model, r=4, lora_alpha=8)
    trainable, total = count_parameters(model)
    # per block: 4 attn (8x8) + gate/up (8->16) + down (16->8); LoRA adds r*(in+out) each
    per_block = 4 * 4 * (8 + 8) + 2 * 4 * (8 + 16) + 4 * (16 + 8)
    assert trainable == 2 * per_block
    assert total == total_before + trainable
    assert [n for n, _ in lora_modules(model)][:2] == ["model.layers.0.self_attn.q_proj",
                                                       "model.layers.0.self_attn.k_proj"]


def test_our_llama_default_targets_and_training_changes_only_adapters():
    from fasttune.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg, use_kernels=False)
    ids = torch.randint(0, 64, (2, 8))
    base = model(ids).logits.detach()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = apply_lora(model, r=4, lora_alpha=8)
    assert len(names) == 2 * 7 and "lm_head" not in names
    torch.testing.assert_close(model(ids).logits, base, rtol=0, atol=0)  # B = 0: the base model
    opt = torch.optim.SGD(lora_parameters(model), lr=0.1)
    for _ in range(2):
        out = model(ids, targets=ids)
        (out.loss_sum / out.n_tokens).backward()
        opt.step()
        opt.zero_grad()
    assert not torch.allclose(model(ids).logits, base)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            torch.testing.assert_close(p, frozen[n.replace(".base_layer", "")], rtol=0, atol=0)
    model.set_use_kernels(True)  # the model's switch reaches the LoRA layers
    assert all(m.use_kernels for _, m in lora_modules(model))
