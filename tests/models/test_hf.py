"""config.json <-> LlamaConfig for each family, the generic-path fallbacks, key normalisation, presets."""

from __future__ import annotations

import importlib.util
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import transformers

from fasttune.models.hf import (
    FAMILIES,
    hf_config_from_llama,
    llama_config_from_hf,
    to_our_keys,
    unsupported_reason,
)
from fasttune.models.llama import LlamaConfig
from fasttune.models.presets import PRESETS, SHAPES


def test_round_trip_through_transformers_config(family_case, tiny_config):
    cfg = tiny_config(**family_case)
    hf_cfg = hf_config_from_llama(cfg)
    assert hf_cfg.model_type == cfg.model_type in FAMILIES
    assert llama_config_from_hf(hf_cfg) == cfg
    assert llama_config_from_hf(hf_cfg.to_dict()) == cfg  # a config.json dict reads the same


def test_llama31_config_json_in_the_transformers_4_layout():
    """The config.json of meta-llama/Llama-3.1-8B as published (rope_theta + rope_scaling at the top)."""
    config_json = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "hidden_act": "silu", "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05, "rope_theta": 500000.0, "attention_bias": False, "mlp_bias": False,
        "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "bos_token_id": 128000,
    }
    assert llama_config_from_hf(config_json) == LlamaConfig(**SHAPES["llama-3.1-8b"])
    loaded = transformers.LlamaConfig.from_dict(config_json)  # what AutoConfig gives from that file
    assert llama_config_from_hf(loaded) == LlamaConfig(**SHAPES["llama-3.1-8b"])


def test_legacy_linear_scaling_with_type_key():
    cfg = llama_config_from_hf({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 1, "num_attention_heads": 4, "rope_scaling": {"type": "linear", "factor": 2.0},
    })
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0}
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 16 and cfg.rope_theta == 10000.0


def test_qwen2_bias_layout():
    hf_cfg = transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=96, num_hidden_layers=1, vocab_size=50)
    cfg = llama_config_from_hf(hf_cfg)
    assert cfg.attention_bias and not cfg.attention_out_bias and not cfg.qk_norm


@pytest.mark.parametrize(
    "config, reason",
    [
        (transformers.GPT2Config(n_layer=1), "model_type"),
        (transformers.OPTConfig(num_hidden_layers=1), "model_type"),
        (transformers.LlamaConfig(num_hidden_layers=1, rope_parameters={
            "rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
            "original_max_position_embeddings": 2048}), "yarn"),
        (transformers.LlamaConfig(num_hidden_layers=1, mlp_bias=True), "mlp_bias"),
        (transformers.LlamaConfig(num_hidden_layers=1, hidden_act="gelu"), "hidden_act"),
        (transformers.Qwen2Config(num_hidden_layers=4, use_sliding_window=True, max_window_layers=2),
         "sliding"),
    ],
)
def test_configs_we_cannot_run_exactly_go_generic(config, reason):
    assert llama_config_from_hf(config) is None
    assert reason in unsupported_reason(config)


def test_unexpressible_configs_raise(tiny_config):
    with pytest.raises(ValueError, match="attention_bias"):
        hf_config_from_llama(tiny_config(model_type="qwen2"))
    with pytest.raises(ValueError, match="qk_norm"):
        hf_config_from_llama(tiny_config(model_type="llama", qk_norm=True))


def test_to_our_keys_strips_prefixes_and_drops_rotary_buffers():
    t = torch.zeros(1)
    got = to_our_keys({
        "base_model.model.model.layers.0.mlp.up_proj.weight": t,
        "layers.1.self_attn.q_proj.weight": t,
        "embed_tokens.weight": t,
        "module._orig_mod.lm_head.weight": t,
        "model.layers.0.self_attn.rotary_emb.inv_freq": t,
        "model.norm.weight": t,
    })
    assert sorted(got) == [
        "lm_head.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
        "model.layers.1.self_attn.q_proj.weight", "model.norm.weight",
    ]


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_shapes_build_valid_configs(name):
    cfg = LlamaConfig(**SHAPES[name])
    assert llama_config_from_hf(hf_config_from_llama(cfg)) == cfg
    assert cfg.num_attention_heads * cfg.head_dim >= cfg.hidden_size or cfg.model_type == "qwen3"


def test_llama_shapes_of_the_brief():
    l31, l2 = LlamaConfig(**SHAPES["llama-3.1-8b"]), LlamaConfig(**SHAPES["llama-2-7b"])
    assert (l31.vocab_size, l31.intermediate_size, l31.num_key_value_heads, l31.rope_theta) == (
        128256, 14336, 8, 500000.0)
    assert l31.rope_scaling["factor"] == 8.0 and l31.rope_scaling["original_max_position_embeddings"] == 8192
    assert (l2.vocab_size, l2.intermediate_size, l2.num_key_value_heads, l2.rope_theta) == (
        32000, 11008, 32, 1e4)
    assert asdict(l31)["num_hidden_layers"] == 32 == l2.num_hidden_layers


def test_smollm2_preset_matches_the_embedded_gguf():
    preset = PRESETS["smollm2-135m"]
    spec = importlib.util.find_spec(preset["gguf_package"])
    if spec is None:
        pytest.skip("the embedded model package is not installed")
    import gguf

    path = Path(list(spec.submodule_search_locations)[0]) / preset["gguf_file"]
    fields = gguf.GGUFReader(path).fields
    meta = {k: fields[k].contents() for k in fields if k.startswith("llama.")}
    shape = SHAPES[preset["shape"]]
    assert meta["llama.block_count"] == shape["num_hidden_layers"]
    assert meta["llama.embedding_length"] == shape["hidden_size"]
    assert meta["llama.feed_forward_length"] == shape["intermediate_size"]
    assert meta["llama.attention.head_count"] == shape["num_attention_heads"]
    assert meta["llama.attention.head_count_kv"] == shape["num_key_value_heads"]
    assert meta["llama.rope.freq_base"] == shape["rope_theta"]
    assert meta["llama.vocab_size"] == shape["vocab_size"]
    assert meta["llama.context_length"] == shape["max_position_embeddings"]
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(shape["rms_norm_eps"])
