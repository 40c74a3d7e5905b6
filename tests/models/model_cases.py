"""Tiny model configurations for the model tests: 2 layers, hidden 64, a prime vocabulary, fp32 on the CPU.

Plain helpers, imported by name (`from model_cases import make_model`): a module name of its own, because
several test folders have a conftest.py and only one module can be called `conftest`.
"""

from __future__ import annotations

import torch

from fasttune.models.llama import LlamaConfig, LlamaForCausalLM

TINY = dict(
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
)

# One entry per family variation the parity tests cover; values override TINY.
FAMILY_CASES: dict[str, dict] = {
    "llama_gqa": dict(model_type="llama"),
    "llama_mha_bias": dict(
        model_type="llama", num_key_value_heads=4, attention_bias=True, attention_out_bias=True
    ),
    "llama3_rope": dict(
        model_type="llama",
        rope_theta=500000.0,
        # original 64 puts some of head_dim 16's wavelengths in each of the three llama3 bands.
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=64),
    ),
    "linear_rope": dict(model_type="llama", rope_scaling=dict(rope_type="linear", factor=4.0)),
    # max_position_embeddings below the test length, so the NTK stretch is active.
    "dynamic_rope": dict(model_type="llama", max_position_embeddings=8,
                         rope_scaling=dict(rope_type="dynamic", factor=2.0)),
    "tied": dict(model_type="llama", tie_word_embeddings=True, num_key_value_heads=1),
    "mistral": dict(model_type="mistral", rope_theta=1e6),
    "mistral_window": dict(model_type="mistral", sliding_window=4),
    "qwen2": dict(
        model_type="qwen2", attention_bias=True, attention_out_bias=False, tie_word_embeddings=True
    ),
    "qwen3": dict(model_type="qwen3", qk_norm=True, head_dim=24, tie_word_embeddings=True),
}


def make_config(**overrides) -> LlamaConfig:
    return LlamaConfig(**{**TINY, **overrides})


def make_model(seed: int = 0, use_kernels: bool = False, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(make_config(**overrides), use_kernels=use_kernels)
    # Norm weights away from one, so a norm applied in the wrong place shows up.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0.0, 0.1)
    return model.eval()


def make_fused_lora_model(layers: int = 3, r: int = 4, b_std: float = 0.1, **overrides) -> LlamaForCausalLM:
    """A tiny model with LoRA (rank r, alpha 2r) on all projections, B ~ N(0, b_std) so that the adapters
    count, on the fused kernel path, training."""
    from fasttune.lora.apply import apply_lora

    model = make_model(num_hidden_layers=layers, **overrides).train()
    apply_lora(model, r=r, lora_alpha=2 * r)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, b_std)
    model.set_use_kernels(True)
    return model


def loss_and_grads(model: LlamaForCausalLM, ids, targets, position_ids=None, autocast: bool = False):
    """One training step's mean token loss (detached) and the gradients of every trainable parameter, from
    zeroed gradients; `autocast`: under bf16 autocast on CUDA."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = model(ids, position_ids=position_ids, targets=targets)
    (out.loss_sum / out.n_tokens).backward()
    return out.loss_sum.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
