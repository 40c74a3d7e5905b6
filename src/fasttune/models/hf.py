"""The boundary with Hugging Face for our Llama family: config.json <-> LlamaConfig, and state-dict keys.

Our parameter names are Hugging Face's, so the key table is the identity; `to_our_keys` only strips the
prefixes other savers add and drops buffers old checkpoints carry. A family member our model cannot run
exactly (YaRN RoPE, Qwen sliding-window layers, MLP bias, ...) maps to None and takes the generic path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from fasttune.models.llama import ROPE_TYPES, LlamaConfig

FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

_MISSING = object()


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Read a field from a transformers config or a config.json dict."""
    value = cfg.get(key, _MISSING) if isinstance(cfg, Mapping) else getattr(cfg, key, _MISSING)
    return default if value is _MISSING or value is None else value


def _rope(hf_config: Any) -> tuple[float, dict | None, str | None]:
    """(rope_theta, rope_scaling or None, reason it is unsupported or None) from v4 or v5 style configs."""
    # transformers 5 keeps everything in `rope_parameters`; 4.x (and older config.json) uses
    # `rope_theta` + `rope_scaling`.
    params = dict(_get(hf_config, "rope_parameters", None) or _get(hf_config, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", _get(hf_config, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None, None
    if kind not in ROPE_TYPES:
        return theta, None, f"rope_type {kind!r} (supported: default, {', '.join(sorted(ROPE_TYPES))})"
    scaling = {"rope_type": kind, **{k: params[k] for k in ROPE_TYPES[kind] if k in params}}
    if kind == "llama3":
        scaling.setdefault("original_max_position_embeddings", _get(hf_config, "max_position_embeddings"))
    return theta, scaling, None


def unsupported_reason(hf_config: Any) -> str | None:
    """Why our model cannot run this config exactly, or None when it can."""
    model_type = _get(hf_config, "model_type")
    if model_type not in FAMILIES:
        return f"model_type {model_type!r} is not one of {sorted(FAMILIES)}"
    if _get(hf_config, "hidden_act", "silu") != "silu":
        return f"hidden_act {_get(hf_config, 'hidden_act')!r} (our MLP is SwiGLU)"
    if _get(hf_config, "mlp_bias", False):
        return "mlp_bias=True"
    if model_type in ("qwen2", "qwen3") and _get(hf_config, "use_sliding_window", False):
        return "Qwen use_sliding_window=True (sliding window on some layers only)"
    if _get(hf_config, "layer_types") and any(t != "full_attention" for t in _get(hf_config, "layer_types")):
        return "layer_types other than full_attention"
    if _get(hf_config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial_rotary_factor != 1"
    return _rope(hf_config)[2]


def llama_config_from_hf(hf_config: Any) -> LlamaConfig | None:
    """Our config for a transformers config (object or config.json dict), or None to use the generic path."""
    if unsupported_reason(hf_config) is not None:
        return None
    model_type = _get(hf_config, "model_type")
    heads = _get(hf_config, "num_attention_heads")
    hidden = _get(hf_config, "hidden_size")
    theta, scaling, _ = _rope(hf_config)
    bias = bool(_get(hf_config, "attention_bias", False))
    return LlamaConfig(
        vocab_size=_get(hf_config, "vocab_size"),
        hidden_size=hidden,
        intermediate_size=_get(hf_config, "intermediate_size"),
        num_hidden_layers=_get(hf_config, "num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=_get(hf_config, "num_key_value_heads", heads),
        head_dim=_get(hf_config, "head_dim", hidden // heads),
        rms_norm_eps=float(_get(hf_config, "rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=_get(hf_config, "max_position_embeddings", 2048),
        tie_word_embeddings=bool(_get(hf_config, "tie_word_embeddings", False)),
        # Qwen2 always has q/k/v bias and never an o_proj bias; Llama/Qwen3 put `attention_bias` on all four.
        attention_bias=True if model_type == "qwen2" else bias,
        attention_out_bias=False if model_type == "qwen2" else bias,
        qk_norm=model_type == "qwen3",
        model_type=model_type,
        sliding_window=_get(hf_config, "sliding_window") if model_type == "mistral" else None,
    )


def hf_config_from_llama(cfg: LlamaConfig, **extra: Any):
    """The transformers config of the right family for `cfg` (export, merge, parity tests).

    `extra` passes other fields through (bos_token_id, eos_token_id, torch_dtype, ...).
    """
    import transformers

    cls = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
    }[cfg.model_type]
    qkv, out = cfg.attention_bias, cfg.attention_out_bias
    if cfg.model_type == "qwen2" and not (qkv and not out):
        raise ValueError("a qwen2 LlamaConfig needs attention_bias=True and attention_out_bias=False")
    if cfg.model_type != "qwen2" and qkv != out:
        raise ValueError(f"{cfg.model_type}: transformers needs attention_bias == attention_out_bias")
    if cfg.model_type == "mistral" and qkv:
        raise ValueError("mistral has no attention bias in transformers")
    if cfg.qk_norm != (cfg.model_type == "qwen3"):
        raise ValueError(f"qk_norm={cfg.qk_norm} cannot be expressed as a {cfg.model_type} config")
    if cfg.model_type == "qwen2" and cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads:
        raise ValueError("qwen2 in transformers has head_dim = hidden_size // num_attention_heads")
    if cfg.sliding_window is not None and cfg.model_type != "mistral":
        raise ValueError(f"sliding_window is only expressed for mistral, not {cfg.model_type}")

    kwargs: dict[str, Any] = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
    )
    if cfg.model_type != "qwen2":
        kwargs["head_dim"] = cfg.head_dim
    if cfg.model_type in ("llama", "qwen3"):
        kwargs["attention_bias"] = qkv
    if cfg.model_type == "mistral":
        kwargs["sliding_window"] = cfg.sliding_window
    rope = {"rope_type": "default", **(cfg.rope_scaling or {})}
    if "rope_parameters" in getattr(cls, "__annotations__", {}):  # transformers >= 5
        kwargs["rope_parameters"] = {**rope, "rope_theta": cfg.rope_theta}
    else:
        kwargs["rope_theta"] = cfg.rope_theta
        kwargs["rope_scaling"] = cfg.rope_scaling
    kwargs.update(extra)
    return cls(**kwargs)


_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")
_BODY = ("embed_tokens.", "layers.", "norm.")


def to_our_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF/PEFT/DDP/compiled state-dict keys -> ours (the HF names); drops old rotary `inv_freq` buffers.

    'base_model.model.model.layers.0.mlp.up_proj.weight' -> 'model.layers.0.mlp.up_proj.weight'
    'layers.0.mlp.up_proj.weight' (a bare LlamaModel)    -> 'model.layers.0.mlp.up_proj.weight'
    """
    out = {}
    for key, value in state_dict.items():
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if key.endswith("rotary_emb.inv_freq"):
            continue
        if key.startswith(_BODY):
            key = "model." + key
        out[key] = value
    return out
