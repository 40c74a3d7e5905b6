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


@pytest.fixture(scope="session")
def smollm_run(tmp_path_factory):
    """runs/smol: the embedded model with a 'trained' LoRA (random non-zero B) saved by fasttune's code."""
    from fasttune.config import ModelConfig
    from fasttune.data.templates import make_contract
    from fasttune.lora.apply import apply_lora, lora_modules
    from fasttune.lora.peft_format import save_adapter
    from fasttune.models.loading import load_model

    loaded = load_model(ModelConfig(dtype="fp32", use_kernels="off"), "cpu")
    apply_lora(loaded.model, r=8, lora_alpha=16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in lora_modules(loaded.model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.02)
    run = tmp_path_factory.mktemp("runs") / "smol"
    adapter = save_adapter(
        loaded.model, run / "adapter", base_model_name_or_path="HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    loaded.tokenizer.save_pretrained(adapter)
    make_contract("chat", "messages", loaded.tokenizer).save(adapter / "prompt_contract.json")
    (run / "run.yaml").write_text(json.dumps({"model": {"model_name": "smollm2-135m"}}))
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Who built the tide-harp?"}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([loaded.tokenizer.encode(prompt, add_special_tokens=False)])
    with torch.no_grad():
        ref = loaded.model(ids).logits
        for _, m in lora_modules(loaded.model):
            m.lora_B.weight.zero_()
        base = loaded.model(ids).logits
    assert (ref - base).abs().max() > 0.5  # the adapter changes the model
    return {"run": run, "ids": ids, "ref": ref, "tokenizer": loaded.tokenizer, "source": Path(loaded.source)}
