"""merge(): merged == base + adapter (transformers + PEFT), shards, tokenizer files, errors, peak memory."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from export_fixtures import peft_logits, save_llama, save_peft_adapter
from safetensors.torch import load_file, save_file

from fasttune.data.templates import PromptContract, render_messages, render_prompt
from fasttune.export.checkpoint import ExportError
from fasttune.export.merge import merge, parse_size


def _logits(model_dir: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def test_merged_fp32_equals_base_plus_adapter(run_dir, llama_dir, tmp_path):
    out = merge(run_dir, tmp_path / "merged", dtype="fp32")
    ids = torch.randint(0, 400, (2, 13), generator=torch.Generator().manual_seed(0))
    ref = peft_logits(llama_dir, run_dir / "adapter", ids)
    got = _logits(out, ids)
    assert (ref - _logits(llama_dir, ids)).abs().max() > 1e-2  # the adapter really changes the output
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_merged_carries_tokenizer_contract_and_config(run_dir, tmp_path):
    from transformers import AutoTokenizer

    out = merge(run_dir, tmp_path / "merged", dtype="bf16")
    contract = PromptContract.load(run_dir / "adapter" / "prompt_contract.json")
    assert PromptContract.load(out / "prompt_contract.json") == contract
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == contract.chat_template
    assert tok.eos_token_id == contract.eos_id
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    gen = json.loads((out / "generation_config.json").read_text())
    eos = gen["eos_token_id"]
    assert contract.eos_id in (eos if isinstance(eos, list) else [eos])
    assert all(t.dtype == torch.bfloat16 for t in load_file(out / "model.safetensors").values())


def test_sharded_bf16_merge_loads_and_index_is_complete(run_dir, llama_dir, tmp_path):
    out = merge(run_dir, tmp_path / "merged", dtype="bf16", max_shard_size="40KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (out / "model.safetensors").exists()
    stored = {k: s.name for s in shards for k in load_file(s)}
    assert stored == index["weight_map"]
    assert index["metadata"]["total_size"] == sum(
        t.numel() * 2 for s in shards for t in load_file(s).values()
    )
    assert set(stored) == set(load_file(llama_dir / "model.safetensors"))
    ids = torch.randint(0, 400, (1, 9), generator=torch.Generator().manual_seed(1))
    ref = peft_logits(llama_dir, run_dir / "adapter", ids)
    torch.testing.assert_close(_logits(out, ids), ref, atol=0.05, rtol=0.05)  # bf16 weights


def test_adapter_dir_and_run_dir_give_the_same_merge(run_dir, tmp_path):
    a = load_file(merge(run_dir, tmp_path / "a", dtype="fp32") / "model.safetensors")
    b = load_file(merge(run_dir / "adapter", tmp_path / "b", dtype="fp32") / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_gpt2_generic_adapter_with_conv1d_weights(gpt2_adapter, tmp_path):
    base, adapter = gpt2_adapter
    assert json.loads((adapter / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    out = merge(adapter, tmp_path / "merged", dtype="fp32")
    ids = torch.randint(0, 400, (2, 11), generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(_logits(out, ids), peft_logits(base, adapter, ids), atol=1e-5, rtol=1e-5)


def test_alpaca_run_gets_a_chat_template_that_renders_the_training_prompt(alpaca_run, tokenizer, tmp_path):
    from transformers import AutoTokenizer

    out = merge(alpaca_run, tmp_path / "merged", dtype="fp32")
    contract = PromptContract.load(alpaca_run / "adapter" / "prompt_contract.json")
    assert contract.template == "alpaca"
    merged_tok = AutoTokenizer.from_pretrained(out)
    one = [{"role": "user", "content": "Tune the L-7."}]
    assert merged_tok.apply_chat_template(one, tokenize=False, add_generation_prompt=True) == render_prompt(
        "Tune the L-7.", "", contract, tokenizer
    )
    convo = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a?"},
        {"role": "assistant", "content": "A."},
        {"role": "user", "content": "b?"},
    ]
    assert merged_tok.apply_chat_template(
        convo, tokenize=False, add_generation_prompt=True
    ) == render_messages(convo, contract, tokenizer)


def test_modules_to_save_and_rank_pattern(llama_dir, tokenizer, tmp_path):
    adapter = save_peft_adapter(
        llama_dir,
        tmp_path / "adapter",
        tokenizer,
        targets=("q_proj", "v_proj"),
        rank_pattern={"v_proj": 2},
        alpha_pattern={"v_proj": 16},
        modules_to_save=["lm_head"],
    )
    out = merge(adapter, tmp_path / "merged", dtype="fp32")
    ids = torch.randint(0, 400, (1, 7), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(_logits(out, ids), peft_logits(llama_dir, adapter, ids), atol=1e-5, rtol=1e-5)


def test_errors_name_the_problem(run_dir, llama_dir, tokenizer, tmp_path):
    with pytest.raises(ExportError, match="no such run"):
        merge(tmp_path / "nope", tmp_path / "o")
    with pytest.raises(ExportError, match="dtype"):
        merge(run_dir, tmp_path / "o", dtype="int4")
    with pytest.raises(ExportError, match="input directory itself"):
        merge(run_dir, run_dir / "adapter")
    dora = tmp_path / "dora"
    dora.mkdir()
    cfg = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    (dora / "adapter_model.safetensors").write_bytes(
        (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    )
    with pytest.raises(ExportError, match="use_dora"):
        merge(dora, tmp_path / "o")
    # An adapter for a model with other layer names.
    other = tmp_path / "other"
    other.mkdir()
    (other / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(llama_dir)}))
    save_file(
        {
            "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.zeros(4, 64),
            "base_model.model.model.layers.9.self_attn.q_proj.lora_B.weight": torch.zeros(64, 4),
        },
        other / "adapter_model.safetensors",
    )
    with pytest.raises(ExportError, match="layers.9.self_attn.q_proj"):
        merge(other, tmp_path / "o")


def test_fp16_overflow_is_refused(llama_dir, tokenizer, tmp_path):
    big = save_llama(tmp_path / "big", tokenizer)
    state = load_file(big / "model.safetensors")
    state["model.norm.weight"][0] = 1e6
    save_file(state, big / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ExportError, match="model.norm.weight.*bf16"):
        merge(big, tmp_path / "o", dtype="fp16")


def test_nf4_prequantised_base_is_dequantised_then_merged(run_dir, llama_dir, tmp_path):
    """A base saved the way transformers saves a bitsandbytes 4-bit model, dequantised on the CPU."""
    from fasttune.kernels.nf4 import dequantize_nf4_reference, quantize_nf4

    q_dir = tmp_path / "bnb"
    q_dir.mkdir()
    dense = load_file(llama_dir / "model.safetensors")
    state, expect = {}, {}
    for i, (key, t) in enumerate(dense.items()):
        if "layers" in key and key.endswith("proj.weight"):
            w = quantize_nf4(t, blocksize=64, nested=bool(i % 2))
            state[key] = w.packed.reshape(-1, 1)
            state[f"{key}.absmax"] = w.absmax
            state[f"{key}.quant_map"] = torch.tensor(
                [
                    -1.0,
                    -0.6962,
                    -0.5251,
                    -0.3949,
                    -0.2844,
                    -0.1848,
                    -0.0911,
                    0.0,
                    0.0796,
                    0.1609,
                    0.2461,
                    0.3379,
                    0.4407,
                    0.5626,
                    0.7230,
                    1.0,
                ]
            )
            w.code = state[f"{key}.quant_map"]
            meta = {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": list(t.shape)}
            if w.nested:
                state[f"{key}.nested_absmax"] = w.nested_absmax
                state[f"{key}.nested_quant_map"] = w.nested_code
                meta.update(nested_blocksize=256, nested_dtype="float32", nested_offset=float(w.offset))
            state[f"{key}.quant_state.bitsandbytes__nf4"] = torch.tensor(
                list(json.dumps(meta).encode()), dtype=torch.uint8
            )
            expect[key] = dequantize_nf4_reference(w).float()
        else:
            state[key] = t
            expect[key] = t
    save_file(state, q_dir / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["quantization_config"] = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": "nf4",
    }
    (q_dir / "config.json").write_text(json.dumps(cfg))
    for f in llama_dir.glob("tokenizer*"):
        (q_dir / f.name).write_bytes(f.read_bytes())

    out = merge(run_dir, tmp_path / "merged", dtype="fp32", base=str(q_dir))
    merged = load_file(out / "model.safetensors")
    assert set(merged) == set(dense)  # no quantisation companions leak into the output
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    plain = load_file(merge(run_dir, tmp_path / "plain", dtype="fp32") / "model.safetensors")
    for key in dense:
        delta = plain[key] - dense[key]  # what the adapter adds (zero for unadapted tensors)
        torch.testing.assert_close(merged[key], expect[key] + delta, atol=1e-5, rtol=1e-5)


def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000
    assert parse_size("500MB") == 500_000_000
    assert parse_size("1GiB") == 1 << 30
    assert parse_size(123) == 123
    with pytest.raises(ExportError, match="max_shard_size"):
        parse_size("lots")


_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch, transformers  # imported before the baseline: the merge, not the libraries, is measured
    from transformers import AutoTokenizer
    from fasttune.export.merge import merge

    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    base = status("VmRSS")
    merge(sys.argv[1], sys.argv[2], dtype="bf16", max_shard_size="64MB")
    print(json.dumps({"baseline": base, "peak": status("VmHWM")}))
""")


@pytest.mark.slow
def test_merge_peak_memory_stays_near_one_shard(tokenizer, tmp_path):
    """A 375 MB fp32 base merged to bf16 in 64 MB shards: peak RSS grows by well under the model's size."""
    from transformers import LlamaConfig

    base = tmp_path / "base"
    base.mkdir()
    hidden, inter, layers, vocab = 1024, 2816, 6, 8192
    LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
    ).save_pretrained(base)
    tokenizer.save_pretrained(base)
    g = torch.Generator().manual_seed(0)
    shapes = {
        "model.embed_tokens.weight": (vocab, hidden),
        "lm_head.weight": (vocab, hidden),
        "model.norm.weight": (hidden,),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {p + f"self_attn.{n}.weight": (hidden, hidden) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        )
        shapes.update(
            {
                p + "mlp.gate_proj.weight": (inter, hidden),
                p + "mlp.up_proj.weight": (inter, hidden),
                p + "mlp.down_proj.weight": (hidden, inter),
                p + "input_layernorm.weight": (hidden,),
                p + "post_attention_layernorm.weight": (hidden,),
            }
        )
    # Two shards written one after the other, so this process never holds the model either.
    names = list(shapes)
    weight_map, size = {}, 0
    for j, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :])):
        shard = {n: torch.randn(shapes[n], generator=g) * 0.02 for n in part}
        fname = f"model-{j + 1:05d}-of-00002.safetensors"
        save_file(shard, base / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        size += sum(t.numel() * 4 for t in shard.values())
        del shard
    (base / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": size}, "weight_map": weight_map})
    )
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    lora = {}
    for i in range(layers):
        for n, (o, k) in {"self_attn.q_proj": (hidden, hidden), "mlp.down_proj": (hidden, inter)}.items():
            lora[f"base_model.model.model.layers.{i}.{n}.lora_A.weight"] = torch.randn(8, k, generator=g)
            lora[f"base_model.model.model.layers.{i}.{n}.lora_B.weight"] = torch.randn(o, 8, generator=g)
    save_file(lora, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "LORA",
                "base_model_name_or_path": str(base),
                "r": 8,
                "lora_alpha": 16,
                "target_modules": ["q_proj", "down_proj"],
            }
        )
    )

    result = subprocess.run(
        [sys.executable, "-c", _PEAK_SCRIPT, str(adapter), str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        check=True,
    )
    mem = json.loads(result.stdout.strip().splitlines()[-1])
    growth = mem["peak"] - mem["baseline"]
    print(f"merge of a {size / 1e6:.0f} MB model: peak RSS growth {growth / 1e6:.0f} MB")
    assert size > 300e6
    # Tensors stream into their shard files: the growth is the largest tensor in fp32 and its bf16 copy,
    # the tokenizer and torch's thread pools (~130 MB here), not the model (or the model twice).
    assert growth < 0.5 * size, f"merge grew RSS by {growth / 1e6:.0f} MB for a {size / 1e6:.0f} MB model"
    merged = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert set(merged["weight_map"]) == set(names)
    assert merged["metadata"]["total_size"] == size // 2


def test_merged_checkpoint_has_what_vllm_and_tgi_read(run_dir, tmp_path):
    import json

    from fasttune.export.contract import load_contract, load_tokenizer, stop_token_ids
    from fasttune.export.serving import serving_problems
    from fasttune.export.source import resolve_source

    src = resolve_source(run_dir)
    stops = stop_token_ids(load_contract(src), load_tokenizer(src))
    out = merge(run_dir, tmp_path / "m", dtype="bf16", max_shard_size="100KB")  # sharded
    assert serving_problems(out, stops) == []
    gen = json.loads((out / "generation_config.json").read_text())
    gen["eos_token_id"] = 0
    (out / "generation_config.json").write_text(json.dumps(gen))
    cfg = json.loads((out / "config.json").read_text())
    del cfg["architectures"]
    (out / "config.json").write_text(json.dumps(cfg))
    next(out.glob("model-00002-of-*.safetensors")).unlink()
    problems = serving_problems(out, stops)
    assert any("lacks the stop ids" in p for p in problems)
    assert any("no 'architectures'" in p for p in problems)
    assert any("shard named in the index is missing" in p for p in problems)
