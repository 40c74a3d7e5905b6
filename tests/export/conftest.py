"""Session fixtures for the export tests (builders in export_fixtures.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from export_fixtures import build_tokenizer, save_llama, save_peft_adapter


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer) -> Path:
    return save_llama(tmp_path_factory.mktemp("base") / "tiny-llama", tokenizer)


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, llama_dir, tokenizer) -> Path:
    """runs/<name>: adapter/ (PEFT files, tokenizer, chat prompt contract), run.yaml naming the base."""
    run = tmp_path_factory.mktemp("runs") / "chatrun"
    save_peft_adapter(llama_dir, run / "adapter", tokenizer, template="chat")
    (run / "run.yaml").write_text(json.dumps({"model": {"model_name": str(llama_dir)}}))
    return run


@pytest.fixture(scope="session")
def alpaca_run(tmp_path_factory, llama_dir, tokenizer) -> Path:
    """An alpaca-template run on the same base (adapter with different random weights)."""
    run = tmp_path_factory.mktemp("runs") / "alpacarun"
    save_peft_adapter(llama_dir, run / "adapter", tokenizer, template="alpaca", seed=2)
    (run / "run.yaml").write_text(json.dumps({"model": {"model_name": str(llama_dir)}}))
    return run


@pytest.fixture(scope="session")
def gpt2_adapter(tmp_path_factory, tokenizer) -> tuple[Path, Path]:
    """(base dir, adapter dir): a tiny GPT-2 (Conv1D weights stored (in, out)) with a PEFT adapter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    )
    GPT2LMHeadModel(cfg).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    adapter = save_peft_adapter(
        root / "base",
        root / "adapter",
        tokenizer,
        template="chat",
        targets=("c_attn", "c_proj", "c_fc"),
        fan_in_fan_out=True,
    )
    return root / "base", adapter


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny OPT model directory: an architecture llama.cpp does not have."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        ffn_dim=64,
        num_attention_heads=4,
        word_embed_proj_dim=32,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("opt") / "tiny-opt"
    OPTForCausalLM(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def llama_cpp():
    """The real llama.cpp (node-llama-cpp, installed by scripts/setup_llamacpp.sh); skips without it unless
    FASTTUNE_REQUIRE_LLAMACPP=1 (scripts/test.sh sets it where node is installed)."""
    import os

    from fasttune.export.llamacpp import find_llamacpp

    found = find_llamacpp()
    if found is None:
        why = "node or node-llama-cpp is not installed (run scripts/setup_llamacpp.sh)"
        if os.environ.get("FASTTUNE_REQUIRE_LLAMACPP") == "1":
            pytest.fail(why)
        pytest.skip(why)
    return found
