"""Exported GGUF files in the real llama.cpp (node-llama-cpp's prebuilt CPU build), on tiny random models:
every --type and every architecture gives llama.cpp's next-token distribution beside transformers + PEFT's,
and greedy answers equal to transformers' for the full-precision files."""

from __future__ import annotations

import gguf
import pytest
import torch
from export_fixtures import CORPUS, peft_logits, save_llama, save_peft_adapter

from fasttune.export.gguf import GGUF_TYPES, export_gguf

Q = gguf.GGMLQuantizationType
# Largest relative error of llama.cpp's centred log-probabilities against transformers reading the same
# file (the same decoded weights). llama.cpp keeps its KV cache in f16 and rounds the activations to 8 bits
# for its quantized products on the CPU, so the bound is looser for quantized files.
MAX_ERR_SAME_FILE = {kind: 2e-2 if kind in ("f32", "f16", "bf16") else 6e-2 for kind in GGUF_TYPES}


def _ids(tokenizer, n: int = 48) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(" ".join(CORPUS[:6]), add_special_tokens=False)[:n])


def _centred(lp: torch.Tensor) -> torch.Tensor:
    return lp - lp.mean(-1, keepdim=True)


def _rel_err(vectors: list[list[float | None]], ref_logits: torch.Tensor) -> float:
    got = torch.tensor([[float("nan") if v is None else v for v in row] for row in vectors])
    ref = torch.log_softmax(ref_logits[: len(vectors)].double(), -1).float()
    got = got[:, : ref.shape[-1]]
    assert torch.isfinite(got).all(), "llama.cpp gave no probability for some token"
    return float((_centred(got) - _centred(ref)).norm() / _centred(ref).norm())


def _hf_greedy(base, adapter, ids: list[int], n: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.eval().generate(
            x,
            attention_mask=torch.ones_like(x),
            do_sample=False,
            max_new_tokens=n,
            min_new_tokens=n,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()


def _gguf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids[None]).logits[0]


@pytest.mark.slow
def test_every_type_decodes_in_llama_cpp_as_in_the_gguf_package(llama_cpp, tokenizer, tmp_path):
    """llama.cpp's own decoding of each file's blocks (K-quants from fasttune's quantizer included) gives the
    distribution transformers computes from the `gguf` package's decoding of the same file."""
    # rows of 256 and 512 values, so the K-quant mixes write real K-quant blocks
    base = save_llama(
        tmp_path / "base",
        tokenizer,
        hidden_size=256,
        intermediate_size=512,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=4,
    )
    adapter = save_peft_adapter(base, tmp_path / "adapter", tokenizer, init_scale=0.02)
    ids = _ids(tokenizer)
    paths = {kind: export_gguf(adapter, tmp_path / f"m.{kind}.gguf", type=kind) for kind in GGUF_TYPES}
    answers = llama_cpp.run(
        [(p, [{"op": "logprobs", "tokens": ids.tolist(), "full": True}]) for p in paths.values()]
    )["jobs"]
    errors = {
        kind: _rel_err(a[0]["vectors"], _gguf_logits(paths[kind], ids)) for kind, a in zip(paths, answers)
    }
    print({k: round(v, 4) for k, v in errors.items()})
    for kind, err in errors.items():
        assert err < MAX_ERR_SAME_FILE[kind], (kind, err)
    # and the file is what it says: the full-precision one is the merged model
    merged = _rel_err(
        answers[list(paths).index("f32")][0]["vectors"], peft_logits(base, adapter, ids[None])[0]
    )
    assert merged < 2e-2, merged
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(paths["q4_k_m"]).tensors}
    # 4 layers: llama.cpp widens layers 2 (every third) and 3 (the last eighth)
    assert [types[f"blk.{i}.ffn_down.weight"] for i in range(4)] == [Q.Q4_K, Q.Q4_K, Q.Q6_K, Q.Q6_K]
    assert types["blk.0.attn_q.weight"] == Q.Q4_K and types["output.weight"] == Q.Q6_K
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(paths["q3_k_m"]).tensors}
    assert types["blk.2.attn_q.weight"] == Q.Q3_K and types["blk.2.attn_output.weight"] == Q.Q4_K


def _arch_model(kind: str, tokenizer, path):
    import transformers

    common = dict(vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    llama_like = dict(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    if kind == "gpt2":
        cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **common)
    elif kind == "gemma":
        cfg = transformers.GemmaConfig(head_dim=16, **llama_like, **common)
    elif kind == "llama3.1":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        }
        cfg = transformers.LlamaConfig(rope_theta=500000.0, rope_scaling=scaling, **llama_like, **common)
    else:
        cls = {
            "mistral": transformers.MistralConfig,
            "qwen2": transformers.Qwen2Config,
            "qwen3": transformers.Qwen3Config,
            "llama": transformers.LlamaConfig,
        }[kind]
        extra = {"head_dim": 16} if kind == "qwen3" else {}
        cfg = cls(tie_word_embeddings=kind in ("qwen2", "qwen3"), **extra, **llama_like, **common)
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


ARCH_TARGETS = {"gpt2": dict(targets=("c_attn", "c_proj", "c_fc"), fan_in_fan_out=True)}


@pytest.mark.parametrize("kind", ["llama", "llama3.1", "mistral", "qwen2", "qwen3", "gpt2", "gemma"])
def test_each_architecture_runs_in_llama_cpp_as_in_transformers(llama_cpp, kind, tokenizer, tmp_path):
    base = _arch_model(kind, tokenizer, tmp_path / "base")
    adapter = save_peft_adapter(
        base, tmp_path / "adapter", tokenizer, init_scale=0.05, **ARCH_TARGETS.get(kind, {})
    )
    path = export_gguf(adapter, tmp_path / f"{kind}.gguf", type="f32")
    ids = _ids(tokenizer, 24)
    prompt = ids[:12].tolist()
    logprobs, greedy = llama_cpp.results(
        path,
        [
            {"op": "logprobs", "tokens": ids.tolist(), "full": True},
            {"op": "generate", "tokens": prompt, "max_tokens": 8, "stop_ids": []},
        ],
    )
    err = _rel_err(logprobs["vectors"], peft_logits(base, adapter, ids[None])[0])
    assert err < 2e-3, err
    assert greedy["tokens"] == _hf_greedy(base, adapter, prompt, 8)
