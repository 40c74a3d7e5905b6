"""A live server on a free local port over a tiny random Llama with SmolLM2's real tokenizer and an Alpaca
prompt contract, shared by the tests of this folder."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "infer"))

from serve_helpers import LiveServer, smollm2_tokenizer_from_gguf  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return smollm2_tokenizer_from_gguf()


@pytest.fixture(scope="session")
def tiny():
    from infer_models import real_vocab_model

    return real_vocab_model(seed=1)


@pytest.fixture(scope="session")
def contract(tokenizer):
    from fasttune.data.templates import make_contract

    return make_contract("alpaca", "alpaca", tokenizer)


@pytest.fixture(scope="module")
def server(tiny, tokenizer, contract):
    """The app over `tiny` with 4 slots of 160 tokens and room for 8 waiting requests."""
    with LiveServer(tiny, tokenizer, contract, slots=4, context=160, max_queue=8) as live:
        yield live


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny, tokenizer):
    """A Hugging Face style directory (config.json, safetensors, tokenizer) of `tiny`."""
    from infer_models import hf_twin

    path = tmp_path_factory.mktemp("tiny-llama")
    hf_twin(tiny).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path
