"""The embedded SmolLM2-135M with a fasttune LoRA adapter, exported to GGUF and read back by transformers and
by fasttune's loader; its tokenizer metadata is compared with what llama.cpp's converter wrote."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch

pytestmark = pytest.mark.slow

TEXTS = [
    "안녕하세요! 오늘 날씨가 좋네요.",
    "Emoji: 🙂🚀👍🏽 and 🦙🦙",
    "def f(x):\n    return {'a': [1, 22, 333]}\n",
    "Tabs\tand   runs of    spaces\n\n\n  end",
    "numbers 12345 3.14159",
    "<|im_start|>user\nhi<|im_end|>",
    "Ünïcödé façade naïve — “quotes”",
    "",
]


def test_q8_0_through_transformers_and_tokenizer_round_trip(smollm_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fasttune.export.gguf import export_gguf

    path = export_gguf(smollm_run["run"], tmp_path / "smol.q8_0.gguf", type="q8_0")
    model = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        got = model(smollm_run["ids"]).logits
    ref = smollm_run["ref"]
    assert (got - ref).norm() / ref.norm() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9

    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    original = smollm_run["tokenizer"]
    for text in TEXTS:
        assert back.encode(text, add_special_tokens=False) == original.encode(
            text, add_special_tokens=False
        ), text
    assert back.eos_token == original.eos_token == "<|im_end|>"
    assert back.chat_template == original.chat_template


@pytest.fixture(scope="module")
def f16_gguf(smollm_run, tmp_path_factory) -> Path:
    from fasttune.export.gguf import export_gguf

    return export_gguf(smollm_run["run"], tmp_path_factory.mktemp("gguf") / "smol.f16.gguf", type="f16")


def test_f16_through_fasttune_loader(smollm_run, f16_gguf, tmp_path, monkeypatch):
    from fasttune.config import ModelConfig
    from fasttune.models.loading import load_model

    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path / "cache"))
    path = f16_gguf
    loaded = load_model(ModelConfig(model_name=str(path), dtype="fp32", use_kernels="off"), "cpu")
    with torch.no_grad():
        got = loaded.model(smollm_run["ids"]).logits
    ref = smollm_run["ref"]
    assert (got - ref).norm() / ref.norm() < 1e-2
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.97


def test_tokenizer_metadata_equals_llama_cpps_own_conversion(f16_gguf):
    """Tokens, types, merges, pre-tokenizer, special ids and chat template as in the shipped GGUF."""
    from fasttune.models.loading import preset_gguf_path

    ours, theirs = gguf.GGUFReader(f16_gguf), gguf.GGUFReader(preset_gguf_path("smollm2-135m"))
    for key in (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
        "llama.context_length",
        "llama.rope.freq_base",
        "llama.attention.head_count_kv",
    ):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert {t.name for t in ours.tensors} == {t.name for t in theirs.tensors}  # tied: no output.weight
