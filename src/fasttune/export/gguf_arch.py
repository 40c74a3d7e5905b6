"""The architectures GGUF export writes: llama.cpp's name for each, its hyperparameters, and the tensor
rewrites llama.cpp expects (llama's Q/K row order, GPT-2's transposed Conv1D weights, Gemma's norm + 1).

`arch_for(cfg)` answers from config.json alone, before any tensor is read, and refuses a model llama.cpp
cannot run as it was trained (OPT, for one: llama.cpp has no OPT architecture).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import gguf
import torch

from fasttune.export.checkpoint import ExportError


class GGUFExportError(ExportError):
    """The model or option cannot be written as GGUF; the message says what is missing."""


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half layout -> llama.cpp's interleaved pairs, per head (rows of q_proj/k_proj or biases).

    Within each head HF keeps the two halves of every rotary pair apart (rows i and i + hd/2);
    llama.cpp wants them adjacent (2i, 2i+1). transformers' GGUF reader applies the inverse.
    """
    rows = w.shape[0]
    w = w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])  # (nh, 2, hd/2, ...)
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])  # (nh * hd, ...)


@dataclass(frozen=True)
class Arch:
    name: str  # general.architecture
    hparams: Callable[[gguf.GGUFWriter, dict], None]
    rewrite: Callable[[str, torch.Tensor, dict], torch.Tensor]  # (HF key, merged tensor, config) -> tensor
    skip: tuple[str, ...] = ()  # HF key suffixes llama.cpp does not read


# ---- the Llama family (our own model) ---------------------------------------------------------------


def _llama_hparams(w: gguf.GGUFWriter, cfg: dict) -> None:
    from fasttune.models.hf import llama_config_from_hf

    lc = llama_config_from_hf(cfg)
    w.add_context_length(lc.max_position_embeddings)
    w.add_embedding_length(lc.hidden_size)
    w.add_block_count(lc.num_hidden_layers)
    w.add_feed_forward_length(lc.intermediate_size)
    w.add_head_count(lc.num_attention_heads)
    w.add_head_count_kv(lc.num_key_value_heads)
    w.add_rope_dimension_count(lc.head_dim)
    if lc.head_dim * lc.num_attention_heads != lc.hidden_size or lc.model_type == "qwen3":
        w.add_key_length(lc.head_dim)
        w.add_value_length(lc.head_dim)
    w.add_rope_freq_base(lc.rope_theta)
    w.add_layer_norm_rms_eps(lc.rms_norm_eps)
    w.add_vocab_size(lc.vocab_size)
    kind = (lc.rope_scaling or {}).get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(lc.rope_scaling["factor"])
    elif kind == "dynamic":
        warnings.warn(
            "GGUF has no dynamic-NTK RoPE; the file uses plain RoPE, which is the same up to "
            f"max_position_embeddings={lc.max_position_embeddings}",
            stacklevel=4,
        )
    if lc.sliding_window is not None and lc.sliding_window < lc.max_position_embeddings:
        warnings.warn(
            f"GGUF llama architecture has no sliding window; sliding_window={lc.sliding_window} "
            "is not carried over",
            stacklevel=4,
        )


def _llama_rewrite(key: str, t: torch.Tensor, cfg: dict) -> torch.Tensor:
    heads = cfg["num_attention_heads"]
    if key.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_qk(t, heads)
    if key.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_qk(t, cfg.get("num_key_value_heads") or heads)
    return t


def _as_is(key: str, t: torch.Tensor, cfg: dict) -> torch.Tensor:
    return t


# ---- GPT-2 and Gemma (the generic path) -------------------------------------------------------------

CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")


def _gpt2_hparams(w: gguf.GGUFWriter, cfg: dict) -> None:
    w.add_context_length(cfg["n_positions"])
    w.add_embedding_length(cfg["n_embd"])
    w.add_feed_forward_length(cfg.get("n_inner") or 4 * cfg["n_embd"])
    w.add_block_count(cfg["n_layer"])
    w.add_head_count(cfg["n_head"])
    w.add_layer_norm_eps(cfg.get("layer_norm_epsilon", 1e-5))
    w.add_vocab_size(cfg["vocab_size"])


def _gpt2_rewrite(key: str, t: torch.Tensor, cfg: dict) -> torch.Tensor:
    # transformers' Conv1D stores (in, out); llama.cpp reads (out, in) like a Linear
    return t.T.contiguous() if key.endswith(CONV1D_WEIGHTS) else t


def _gemma_hparams(w: gguf.GGUFWriter, cfg: dict) -> None:
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(cfg.get("num_key_value_heads") or heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(cfg.get("rms_norm_eps", 1e-6))
    w.add_vocab_size(cfg["vocab_size"])


def _gemma_rewrite(key: str, t: torch.Tensor, cfg: dict) -> torch.Tensor:
    # Gemma's RMSNorm multiplies by (1 + weight); llama.cpp's by weight
    return t.float() + 1 if key.endswith("norm.weight") else t


LLAMA = Arch("llama", _llama_hparams, _llama_rewrite, ("rotary_emb.inv_freq",))
ARCHS: dict[str, Arch] = {
    "llama": LLAMA,
    "mistral": LLAMA,
    "qwen2": Arch("qwen2", _llama_hparams, _as_is, ("rotary_emb.inv_freq",)),
    "qwen3": Arch("qwen3", _llama_hparams, _as_is, ("rotary_emb.inv_freq",)),
    "gpt2": Arch("gpt2", _gpt2_hparams, _gpt2_rewrite, (".attn.bias", ".attn.masked_bias")),
    "gemma": Arch("gemma", _gemma_hparams, _gemma_rewrite, ("rotary_emb.inv_freq",)),
}
_NO_ARCH = {
    "opt": "llama.cpp has no OPT architecture",
    "gemma2": "fasttune's GGUF export writes Gemma 1; Gemma 2's soft-capping and extra norms are not covered",
    "gemma3": "fasttune's GGUF export writes Gemma 1; Gemma 3 is not covered",
}
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # llama.cpp's GELU is the tanh approximation


def _unsupported(model_type: str, cfg: dict) -> str | None:
    if model_type in ("llama", "mistral", "qwen2", "qwen3"):
        from fasttune.models.hf import unsupported_reason

        return unsupported_reason(cfg)
    if model_type == "gpt2":
        if cfg.get("activation_function", "gelu_new") not in _GELU_TANH:
            act = cfg.get("activation_function")
            return f"activation_function {act!r} (llama.cpp's GPT-2 uses tanh GELU)"
        for flag in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
            if cfg.get(flag):
                return f"{flag}=True"
        if cfg.get("scale_attn_weights") is False:
            return "scale_attn_weights=False"
        return None
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _GELU_TANH:
        return f"hidden_activation {act!r} (llama.cpp's Gemma uses tanh GELU)"
    return None


def arch_for(cfg: dict) -> Arch:
    """The GGUF architecture of a config.json, or GGUFExportError saying why llama.cpp cannot take it."""
    model_type = cfg.get("model_type")
    if model_type not in ARCHS:
        why = _NO_ARCH.get(model_type, f"model_type {model_type!r} is not one of them")
        raise GGUFExportError(
            f"GGUF export covers {', '.join(ARCHS)}; this model is {model_type!r}: {why}. "
            "Use 'fasttune merge' for a Hugging Face checkpoint instead."
        )
    reason = _unsupported(model_type, cfg)
    if reason is not None:
        raise GGUFExportError(f"GGUF export of this {model_type} model is not covered: {reason}")
    return ARCHS[model_type]


def n_layers(cfg: dict) -> int:
    return cfg.get("num_hidden_layers") or cfg["n_layer"]
