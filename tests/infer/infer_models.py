"""Tiny random Llama-family models with a transformers twin holding the same weights, for generation tests.

Plain helpers, imported by name (`from infer_models import make_model`): a module name of its own, because
several test folders have a conftest.py and only one module can be called `conftest`.
"""

from __future__ import annotations

import torch

from fasttune.models.hf import hf_config_from_llama
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)


def make_model(seed: int = 0, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**TINY, **overrides}))
    # Larger weights than the training init give peaked next-token distributions, so greedy choices are
    # not decided by float noise (a near-tie would make two correct implementations disagree).
    model.init_weights(std=0.25)
    return model.eval()


def hf_twin(model: LlamaForCausalLM):
    """The transformers model of the same family with our weights."""
    import transformers

    hf_cfg = hf_config_from_llama(model.config)
    hf_cfg._attn_implementation = "eager"
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg)
    missing, unexpected = hf.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf.eval()


def left_pad(prompts: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    return ids, mask


def real_vocab_model(seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama over SmolLM2's whole vocabulary, so that the real tokenizer's ids fit."""
    return make_model(seed, vocab_size=49152, hidden_size=32, intermediate_size=64)
