"""export_gguf(): the file loads back through transformers' GGUF reader and fasttune's loader with the logits
of base + adapter, its tokenizer encodes like the original, and its metadata is what llama.cpp expects."""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import pytest
import torch
from export_fixtures import CORPUS, peft_logits, save_llama, save_peft_adapter

from fasttune.export.gguf import GGUFExportError, export_gguf, permute_qk

STRINGS = CORPUS[:9] + ["", " ", "\n\n\n", "a  b   c", "<|im_start|>user\nhi<|im_end|>\n", "🙂🙂🙂 x"]


def _gguf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents()


def _ids(n: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 400, (2, n), generator=torch.Generator().manual_seed(seed))


def test_permute_qk_is_undone_by_transformers_reader():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = torch.randn(6 * 8, 5)  # 6 heads of head_dim 8
    undo = LlamaTensorProcessor(config={"num_attention_heads": 6, "num_key_value_heads": 6})
    back = undo.process(permute_qk(w, 6).numpy(), "blk.0.attn_q.weight").weights
    torch.testing.assert_close(torch.from_numpy(back), w)
    # Within a head the halves of each rotary pair become adjacent rows: rows (0, 4) -> (0, 1).
    torch.testing.assert_close(permute_qk(w, 6)[1], w[4])


@pytest.mark.parametrize("kind,atol,min_agree", [("f32", 1e-5, 1.0), ("f16", 2e-2, 1.0), ("q8_0", None, 0.9)])
def test_gguf_logits_match_base_plus_adapter(run_dir, llama_dir, tmp_path, kind, atol, min_agree):
    path = export_gguf(run_dir, tmp_path / f"m.{kind}.gguf", type=kind)
    ids = _ids()
    ref = peft_logits(llama_dir, run_dir / "adapter", ids)
    got = _gguf_logits(path, ids)
    if atol is not None:
        torch.testing.assert_close(got, ref, atol=atol, rtol=atol)
    else:  # q8_0: close in relative terms, and the same next token at most positions
        assert (got - ref).norm() / ref.norm() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= min_agree


def test_gguf_loads_in_fasttune_loader(run_dir, llama_dir, tmp_path, monkeypatch):
    from fasttune.config import ModelConfig
    from fasttune.models.loading import load_model

    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path / "cache"))
    path = export_gguf(run_dir, tmp_path / "m.f16.gguf", type="f16")
    loaded = load_model(ModelConfig(model_name=str(path), dtype="fp32", use_kernels="off"), "cpu")
    assert loaded.family == "llama"
    ids = _ids(seed=1)
    with torch.no_grad():
        got = loaded.model(ids).logits
    torch.testing.assert_close(got, peft_logits(llama_dir, run_dir / "adapter", ids), atol=2e-2, rtol=2e-2)


def test_gguf_tokenizer_encodes_like_the_original(run_dir, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    path = export_gguf(run_dir, tmp_path / "m.gguf", type="q8_0")
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for s in STRINGS:
        assert back.encode(s, add_special_tokens=False) == tokenizer.encode(s, add_special_tokens=False), s
        assert back.decode(tokenizer.encode(s, add_special_tokens=False)) == s
    assert (back.bos_token, back.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert back.chat_template == tokenizer.chat_template


def test_gguf_metadata(run_dir, llama_dir, tokenizer, tmp_path):
    import json

    path = export_gguf(run_dir, tmp_path / "m.gguf", type="q8_0")
    r = gguf.GGUFReader(path)
    cfg = json.loads((llama_dir / "config.json").read_text())
    assert _field(r, "general.architecture") == "llama"
    assert _field(r, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert _field(r, "llama.block_count") == cfg["num_hidden_layers"]
    assert _field(r, "llama.embedding_length") == cfg["hidden_size"]
    assert _field(r, "llama.feed_forward_length") == cfg["intermediate_size"]
    assert _field(r, "llama.attention.head_count") == cfg["num_attention_heads"]
    assert _field(r, "llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert _field(r, "llama.context_length") == cfg["max_position_embeddings"]
    assert _field(r, "llama.rope.dimension_count") == cfg["hidden_size"] // cfg["num_attention_heads"]
    assert math.isclose(_field(r, "llama.rope.freq_base"), 10000.0)
    assert math.isclose(_field(r, "llama.attention.layer_norm_rms_epsilon"), 1e-5, rel_tol=1e-6)
    assert _field(r, "llama.vocab_size") == cfg["vocab_size"]
    tokens = _field(r, "tokenizer.ggml.tokens")
    assert len(tokens) == cfg["vocab_size"] == len(tokenizer) + 5
    assert tokens[-1] == f"[PAD{cfg['vocab_size'] - 1}]"  # rows the tokenizer does not use
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[2] == gguf.TokenType.CONTROL and types[100] == gguf.TokenType.NORMAL
    assert types[-1] == gguf.TokenType.UNUSED
    assert _field(r, "tokenizer.ggml.model") == "gpt2" and _field(r, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(r, "tokenizer.ggml.eos_token_id") == 2 and _field(r, "tokenizer.ggml.bos_token_id") == 1
    assert _field(r, "tokenizer.ggml.padding_token_id") != 2  # pad is never EOS
    assert _field(r, "tokenizer.ggml.add_bos_token") is False
    assert len(_field(r, "tokenizer.ggml.merges")) == len(
        json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    )
    by_name = {t.name: t for t in r.tensors}
    assert "output.weight" in by_name  # untied
    assert by_name["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert by_name["blk.1.ffn_down.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert list(by_name["blk.0.attn_k.weight"].shape) == [cfg["hidden_size"], 32]  # GGUF: innermost first


def test_tied_model_omits_output_tensor(tokenizer, tmp_path):
    base = save_llama(tmp_path / "tied", tokenizer, tie_word_embeddings=True)
    adapter = save_peft_adapter(base, tmp_path / "adapter", tokenizer)
    path = export_gguf(adapter, tmp_path / "t.gguf", type="f32")
    assert "output.weight" not in {t.name for t in gguf.GGUFReader(path).tensors}
    ids = _ids(seed=2)
    torch.testing.assert_close(_gguf_logits(path, ids), peft_logits(base, adapter, ids), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["qwen2", "qwen3", "mistral"])
def test_other_llama_family_members_round_trip(model_type, tokenizer, tmp_path):
    import transformers

    cls = {
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }[model_type]
    torch.manual_seed(0)
    cfg = cls(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=model_type != "mistral",
        # transformers' GGUF reader ignores qwen3's attention.key_length and assumes Qwen3Config's
        # default head_dim 128 (as in the real Qwen3 models), so the tiny model keeps 128 too.
        head_dim=128 if model_type == "qwen3" else 16,
    )
    base = tmp_path / "base"
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(base)
    tokenizer.save_pretrained(base)
    adapter = save_peft_adapter(base, tmp_path / "adapter", tokenizer)
    path = export_gguf(adapter, tmp_path / f"{model_type}.gguf", type="f32")
    r = gguf.GGUFReader(path)
    arch = _field(r, "general.architecture")
    assert arch == {"mistral": "llama"}.get(model_type, model_type)
    if model_type == "qwen3":  # llama.cpp reads head_dim != hidden / heads from key_length
        assert _field(r, "qwen3.attention.key_length") == 128
        assert {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"} <= {t.name for t in r.tensors}
    if model_type == "qwen2":
        assert "blk.0.attn_q.bias" in {t.name for t in r.tensors}
    ids = _ids(seed=3)
    torch.testing.assert_close(_gguf_logits(path, ids), peft_logits(base, adapter, ids), atol=1e-5, rtol=1e-5)


def test_llama3_rope_scaling_writes_rope_freqs(tokenizer, tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    base = save_llama(tmp_path / "l3", tokenizer, rope_theta=500000.0, rope_scaling=scaling)
    path = export_gguf(base, tmp_path / "l3.gguf", type="f16")
    freqs = {t.name: t for t in gguf.GGUFReader(path).tensors}["rope_freqs.weight"].data
    # llama.cpp divides each default frequency by this factor: 1 for short wavelengths, `factor` for
    # long ones, a smooth blend between (written out here independently of fasttune's RoPE code).
    hd, expect = 16, []
    for i in range(hd // 2):
        wavelen = 2 * math.pi * 500000.0 ** (2 * i / hd)
        if wavelen < 64 / 4.0:
            expect.append(1.0)
        elif wavelen > 64 / 1.0:
            expect.append(8.0)
        else:
            smooth = (64 / wavelen - 1.0) / (4.0 - 1.0)
            expect.append(1 / ((1 - smooth) / 8.0 + smooth))
    torch.testing.assert_close(
        torch.tensor(freqs, dtype=torch.float32), torch.tensor(expect), rtol=1e-5, atol=0
    )
    assert {1.0, 8.0} <= set(expect) and len(set(expect)) > 2  # all three bands are exercised


def test_quantised_4bit_types_write_and_load(run_dir, tmp_path):
    path = export_gguf(run_dir, tmp_path / "m.q4_0.gguf", type="q4_0")
    r = gguf.GGUFReader(path)
    by_name = {t.name: t.tensor_type for t in r.tensors}
    assert by_name["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q4_0
    assert by_name["token_embd.weight"] == gguf.GGMLQuantizationType.Q8_0  # embeddings kept wider
    # The stored 4-bit weight decodes to the merged weight within q4_0's error (the tiny random model
    # itself amplifies it too much for a logits comparison).
    from safetensors.torch import load_file

    from fasttune.export.merge import merge

    merged = load_file(merge(run_dir, tmp_path / "merged", dtype="fp32") / "model.safetensors")
    up = {t.name: t for t in r.tensors}["blk.0.ffn_up.weight"]
    decoded = torch.from_numpy(gguf.quants.dequantize(up.data, up.tensor_type))
    want = merged["model.layers.0.mlp.up_proj.weight"]
    assert decoded.shape == want.shape
    assert 0 < (decoded - want).norm() / want.norm() < 0.15
    logits = _gguf_logits(path, _ids(seed=4))
    assert logits.shape == (2, 12, 405) and torch.isfinite(logits).all()


def test_gpt2_round_trips_with_its_conv1d_weights_transposed(gpt2_adapter, tmp_path):
    base, adapter = gpt2_adapter
    path = export_gguf(adapter, tmp_path / "gpt2.gguf", type="f32")
    r = gguf.GGUFReader(path)
    assert _field(r, "general.architecture") == "gpt2"
    by_name = {t.name: t for t in r.tensors}
    assert {"position_embd.weight", "blk.1.attn_qkv.bias", "output_norm.bias"} <= set(by_name)
    assert "output.weight" not in by_name  # tied to token_embd
    assert list(by_name["blk.0.attn_qkv.weight"].shape) == [32, 96]  # (in, out) innermost first
    # transformers' GGUF reader sizes GPT-2's position table from another field, so compare the tensors
    # here (the llama.cpp tier compares answers)
    from safetensors.torch import load_file

    from fasttune.export.merge import merge

    merged = load_file(merge(adapter, tmp_path / "merged", dtype="fp32") / "model.safetensors")
    for name, key, transposed in [
        ("blk.1.attn_qkv.weight", "transformer.h.1.attn.c_attn.weight", True),
        ("blk.0.ffn_down.weight", "transformer.h.0.mlp.c_proj.weight", True),
        ("position_embd.weight", "transformer.wpe.weight", False),
    ]:
        want = merged[key].T if transposed else merged[key]
        torch.testing.assert_close(torch.from_numpy(by_name[name].data.copy()), want, rtol=0, atol=0)


def test_architecture_llama_cpp_lacks_is_refused_before_any_work(opt_dir, tmp_path):
    with pytest.raises(GGUFExportError, match=r"'opt': llama.cpp has no OPT architecture"):
        export_gguf(opt_dir, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(GGUFExportError, match="q3_k"):
        export_gguf(opt_dir, tmp_path / "x.gguf", type="q3_k")


def test_sentencepiece_style_tokenizer_round_trips(tmp_path):
    """Llama-2/Mistral-style BPE (byte fallback, '▁' for spaces) is written as tokenizer model 'llama'."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    trained = Tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False)
    trained.train_from_iterator([c.replace(" ", "▁") for c in CORPUS], trainer)
    learned = json.loads(trained.to_str())["model"]
    # As in Llama 2's tokenizer.json: <unk> <s> </s>, the 256 byte tokens, then the learned pieces.
    pieces = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
    pieces += [t for t in sorted(learned["vocab"], key=learned["vocab"].get) if t not in pieces]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(
        models.BPE(
            {t: i for i, t in enumerate(pieces)}, merges, byte_fallback=True, unk_token="<unk>", fuse_unk=True
        )
    )
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    base = save_llama(tmp_path / "spm", fast)
    path = export_gguf(base, tmp_path / "spm.gguf", type="f16")
    r = gguf.GGUFReader(path)
    assert _field(r, "tokenizer.ggml.model") == "llama"
    assert _field(r, "tokenizer.ggml.add_space_prefix") is True
    types = _field(r, "tokenizer.ggml.token_type")
    assert types[3 + 0x41] == gguf.TokenType.BYTE and types[1] == gguf.TokenType.CONTROL
    assert types[300] == gguf.TokenType.NORMAL
    scores = _field(r, "tokenizer.ggml.scores")
    first = "".join(merges[0])  # the first merge's result scores above the last one's
    assert scores[pieces.index(first)] > scores[pieces.index("".join(merges[-1]))]
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for s in ["The tide-harp has seven strings.", "def f(x):", "numbers 12345", "café naïve", "안녕 🙂"]:
        assert back.encode(s, add_special_tokens=False) == fast.encode(s, add_special_tokens=False), s
