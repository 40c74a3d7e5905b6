"""Which GGUF type each tensor gets for an export `--type`: the uniform types and llama.cpp's K-quant mixes.

The *_M / *_S mixes follow llama.cpp's per-tensor choice (its `llama-quantize` rules for these file
types): the output head gets Q6_K; attn_v and ffn_down get more bits in the first and last eighth of the
layers and every third layer between (`more_bits`); Q3_K_M also widens attn_output and the fused QKV.
A row that does not fill whole 256-value super-blocks takes llama.cpp's fallback type (Q4_K -> Q5_0,
Q5_K -> Q5_1, Q6_K -> Q8_0, Q3_K -> IQ4_NL), and F16 where even that block does not fit. Norms and
biases (1-D) stay F32; GPT-2's position embeddings stay 16-bit, as llama.cpp leaves them.

    tensor_types("q4_k_m", [("blk.0.attn_v.weight", (256, 1024)), ...], n_layer=16)
        -> {"blk.0.attn_v.weight": Q6_K, ...}
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import gguf

Q = gguf.GGMLQuantizationType
F = gguf.LlamaFileType


@dataclass(frozen=True)
class GGUFType:
    """One `--type`: the type of the 2-D weights, of token_embd / output, and the header's file type."""

    weight: Q
    embed: Q
    file_type: F
    mix: str | None = None  # a llama.cpp K-quant mix: per-tensor rules in `_mix_type`


GGUF_TYPES: dict[str, GGUFType] = {
    "f16": GGUFType(Q.F16, Q.F16, F.MOSTLY_F16),
    "bf16": GGUFType(Q.BF16, Q.BF16, F.MOSTLY_BF16),
    "f32": GGUFType(Q.F32, Q.F32, F.ALL_F32),
    "q8_0": GGUFType(Q.Q8_0, Q.Q8_0, F.MOSTLY_Q8_0),
    # Embeddings and the output head lose most from 4/5-bit; keep them in q8_0.
    "q5_1": GGUFType(Q.Q5_1, Q.Q8_0, F.MOSTLY_Q5_1),
    "q5_0": GGUFType(Q.Q5_0, Q.Q8_0, F.MOSTLY_Q5_0),
    "q4_1": GGUFType(Q.Q4_1, Q.Q8_0, F.MOSTLY_Q4_1),
    "q4_0": GGUFType(Q.Q4_0, Q.Q8_0, F.MOSTLY_Q4_0),
    "q6_k": GGUFType(Q.Q6_K, Q.Q6_K, F.MOSTLY_Q6_K, "q6_k"),
    "q5_k_m": GGUFType(Q.Q5_K, Q.Q5_K, F.MOSTLY_Q5_K_M, "q5_k_m"),
    "q4_k_m": GGUFType(Q.Q4_K, Q.Q4_K, F.MOSTLY_Q4_K_M, "q4_k_m"),
    "q4_k_s": GGUFType(Q.Q4_K, Q.Q4_K, F.MOSTLY_Q4_K_S, "q4_k_s"),
    "q3_k_m": GGUFType(Q.Q3_K, Q.Q3_K, F.MOSTLY_Q3_K_M, "q3_k_m"),
}
# Written by fasttune's own quantizer (export/kquants.py); the rest by the `gguf` package.
OWN_QUANTIZER = (Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL)
_FALLBACK = {Q.Q4_K: Q.Q5_0, Q.Q5_K: Q.Q5_1, Q.Q6_K: Q.Q8_0, Q.Q3_K: Q.IQ4_NL}
_LAYER = re.compile(r"blk\.(\d+)\.")


def more_bits(i_layer: int, n_layer: int) -> bool:
    """The layers a mix gives more bits: the first and last eighth, and every third one between."""
    return i_layer < n_layer // 8 or i_layer >= 7 * n_layer // 8 or (i_layer - n_layer // 8) % 3 == 2


def _mix_type(mix: str, base: Q, name: str, i_layer: int, n_layer: int, i_v: int, n_v: int) -> Q:
    if mix == "q6_k":
        return base
    if name.endswith("attn_v.weight"):
        if mix == "q3_k_m":
            t = Q.Q5_K if i_v < 2 else Q.Q4_K
        elif mix in ("q4_k_m", "q5_k_m") and more_bits(i_v, n_v):
            t = Q.Q6_K
        elif mix == "q4_k_s" and i_v < 4:
            t = Q.Q5_K
        else:
            t = base
        # llama.cpp's 70B rule: one attn_v per 8 query heads is small, so it gets more bits
        return Q.Q5_K if n_layer == 80 and t in (Q.Q3_K, Q.Q4_K) else t
    if name.endswith("ffn_down.weight"):
        if mix == "q3_k_m":
            return Q.Q5_K if i_layer < n_layer // 16 else Q.Q4_K
        if mix in ("q4_k_m", "q5_k_m") and more_bits(i_layer, n_layer):
            return Q.Q6_K
        if mix == "q4_k_s" and i_layer < n_layer // 8:
            return Q.Q5_K
        return base
    if name.endswith("attn_output.weight"):
        return Q.Q4_K if mix == "q3_k_m" else base
    if name.endswith("attn_qkv.weight"):
        return {"q3_k_m": Q.Q4_K, "q4_k_m": Q.Q5_K, "q5_k_m": Q.Q6_K}.get(mix, base)
    return base


def _fit(qtype: Q, cols: int) -> Q:
    """The type itself if a row fills whole blocks of it, else llama.cpp's fallback, else F16."""
    if cols % gguf.GGML_QUANT_SIZES[qtype][0] == 0:
        return qtype
    fallback = _FALLBACK.get(qtype)
    if fallback is not None and cols % gguf.GGML_QUANT_SIZES[fallback][0] == 0:
        return fallback
    return Q.F16


def tensor_types(type_name: str, tensors: list[tuple[str, tuple[int, ...]]], n_layer: int) -> dict[str, Q]:
    """GGUF name -> type for every tensor of one export (names in llama.cpp's spelling, shapes (out, in))."""
    spec = GGUF_TYPES[type_name]
    names = [name for name, _ in tensors]
    has_output = "output.weight" in names
    n_v = sum(name.endswith("attn_v.weight") for name in names)
    i_v = 0
    types = {}
    for name, shape in tensors:
        if len(shape) == 1:
            types[name] = Q.F32
            continue
        cols = shape[-1]
        if name == "position_embd.weight":  # llama.cpp never quantizes learned position embeddings
            types[name] = spec.weight if spec.weight in (Q.F32, Q.F16, Q.BF16) else Q.F16
            continue
        head = name == "output.weight" or (not has_output and name == "token_embd.weight")
        if spec.mix is None:
            qtype = spec.embed if name in ("token_embd.weight", "output.weight") else spec.weight
        elif head:
            # llama.cpp: the output head (or the tied embedding that serves as it) in Q6_K, Q8_0 if its
            # rows do not fill super-blocks
            qtype = Q.Q6_K if cols % gguf.GGML_QUANT_SIZES[Q.Q6_K][0] == 0 else Q.Q8_0
        else:
            m = _LAYER.match(name)
            qtype = _mix_type(spec.mix, spec.weight, name, int(m.group(1)) if m else 0, n_layer, i_v, n_v)
        i_v += name.endswith("attn_v.weight")
        types[name] = _fit(qtype, cols)
    return types
