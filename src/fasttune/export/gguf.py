"""`export_gguf`: base + LoRA (or a model directory) -> one GGUF file for llama.cpp and Ollama, from Python.

No llama.cpp build: the `gguf` package writes the file. Tensors stream one at a time (merged in fp32,
then cast or quantised), in llama.cpp's names, with the Q/K rows permuted as llama.cpp's
`convert_hf_to_gguf.py` does for the llama architecture. The metadata carries the hyperparameters,
the tokenizer and the run's chat template and stop ids.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from fasttune.export.checkpoint import CheckpointReader, ExportError, logical_specs
from fasttune.export.contract import chat_template_for, load_contract, load_tokenizer
from fasttune.export.gguf_tokenizer import vocab_from_tokenizer
from fasttune.export.source import ExportSource, iter_merged, resolve_source

Q = gguf.GGMLQuantizationType
# --type -> (type of the 2-D weights, type of token_embd/output, file type recorded in the header)
GGUF_TYPES: dict[str, tuple[Q, Q, gguf.LlamaFileType]] = {
    "f16": (Q.F16, Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "bf16": (Q.BF16, Q.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "f32": (Q.F32, Q.F32, gguf.LlamaFileType.ALL_F32),
    "q8_0": (Q.Q8_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    # Embeddings and the output head lose most from 4/5-bit; llama.cpp keeps them wider too.
    "q5_1": (Q.Q5_1, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q5_1),
    "q5_0": (Q.Q5_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "q4_1": (Q.Q4_1, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q4_1),
    "q4_0": (Q.Q4_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# model_type -> (GGUF architecture, whether Q/K rows are permuted into llama.cpp's rotary layout)
ARCHS: dict[str, tuple[str, bool]] = {
    "llama": ("llama", True),
    "mistral": ("llama", True),
    "qwen2": ("qwen2", False),
    "qwen3": ("qwen3", False),
}
_ARCH_ENUM = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}


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


@dataclass
class _Planned:
    key: str  # base checkpoint key
    name: str  # GGUF tensor name
    shape: list[int]  # torch shape (out, in)
    qtype: Q


def _check_supported(src: ExportSource) -> dict:
    cfg = src.hf_config
    model_type = cfg.get("model_type")
    if model_type not in ARCHS:
        raise GGUFExportError(
            f"GGUF export covers {', '.join(ARCHS)}; this run's model is {model_type!r}. Merge it with "
            "'fasttune merge' and convert the merged directory with llama.cpp's convert_hf_to_gguf.py."
        )
    from fasttune.models.hf import unsupported_reason

    reason = unsupported_reason(cfg)
    if reason is not None:
        raise GGUFExportError(f"GGUF export of this {model_type} model is not covered: {reason}")
    return cfg


def _plan(reader: CheckpointReader, cfg: dict, arch: str, weight_type: Q, embed_type: Q) -> list[_Planned]:
    n_layers = cfg["num_hidden_layers"]
    name_map = gguf.get_tensor_name_map(_ARCH_ENUM[arch], n_layers)
    tied = bool(cfg.get("tie_word_embeddings", False))
    specs = logical_specs(reader)
    plan = []
    for key, (shape, _) in specs.items():
        if key.endswith("rotary_emb.inv_freq") or (tied and key == "lm_head.weight"):
            continue
        stem, _, suffix = key.rpartition(".")
        name = name_map.get_name(stem)
        if name is None:
            raise GGUFExportError(f"GGUF export: no llama.cpp name for tensor {key!r} of this {arch} model")
        if len(shape) == 1:
            qtype = Q.F32  # norms and biases stay f32, as llama.cpp writes them
        else:
            qtype = embed_type if name in ("token_embd", "output") else weight_type
            block = gguf.GGML_QUANT_SIZES[qtype][0]
            if shape[-1] % block:
                qtype = Q.F16  # a row that does not fill whole quantisation blocks
        plan.append(_Planned(key, f"{name}.{suffix}", shape, qtype))
    return plan


def _nbytes(shape: list[int], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _encode(t: torch.Tensor, qtype: Q) -> np.ndarray:
    a = t.detach().to(torch.float32).cpu().numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


def _write_hparams(w: gguf.GGUFWriter, cfg: dict, src: ExportSource, file_type: gguf.LlamaFileType) -> None:
    from fasttune.models.hf import llama_config_from_hf

    lc = llama_config_from_hf(cfg)
    name = src.run_dir.name if src.run_dir is not None else Path(src.base_name).name
    w.add_name(name)
    w.add_type(gguf.GGUFType.MODEL)
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
    w.add_file_type(int(file_type))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    kind = (lc.rope_scaling or {}).get("rope_type")
    if kind == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(lc.rope_scaling["factor"])
    elif kind == "dynamic":
        warnings.warn(
            "GGUF has no dynamic-NTK RoPE; the file uses plain RoPE, which is the same up to "
            f"max_position_embeddings={lc.max_position_embeddings}",
            stacklevel=3,
        )
    if lc.sliding_window is not None and lc.sliding_window < lc.max_position_embeddings:
        warnings.warn(
            f"GGUF llama architecture has no sliding window; sliding_window={lc.sliding_window} "
            "is not carried over",
            stacklevel=3,
        )


def _source_gguf_pre(src: ExportSource) -> str | None:
    """`tokenizer.ggml.pre` of the GGUF file the base was converted from (the embedded preset, a .gguf
    model_name): the converted tokenizer.json no longer spells it out (SmolLM splits single digits)."""
    import json

    from fasttune.models.loading import CACHE_MARKER

    marker = src.base_dir / CACHE_MARKER
    if not marker.is_file():
        return None
    source = Path(json.loads(marker.read_text()).get("source", ""))
    if not source.is_file():
        return None
    field = gguf.GGUFReader(source).fields.get("tokenizer.ggml.pre")
    return str(field.contents()) if field is not None else None


def _rope_freqs(cfg: dict) -> torch.Tensor | None:
    """llama.cpp's `rope_freqs` for Llama 3.1 RoPE: the divisor of each default frequency."""
    from fasttune.models.hf import llama_config_from_hf
    from fasttune.models.llama import rope_inv_freq

    lc = llama_config_from_hf(cfg)
    if (lc.rope_scaling or {}).get("rope_type") != "llama3":
        return None
    plain = rope_inv_freq(lc.head_dim, lc.rope_theta, None, lc.max_position_embeddings)
    scaled = rope_inv_freq(lc.head_dim, lc.rope_theta, lc.rope_scaling, lc.max_position_embeddings)
    return plain / scaled  # (hd/2,)


def export_gguf(
    run_or_adapter_or_model_dir: str | Path,
    out_file: str | Path,
    type: str = "f16",
    *,
    base: str | None = None,
    device: str = "cpu",
) -> Path:
    """Write a GGUF file of the merged model. Returns `out_file`.

    run_or_adapter_or_model_dir: `runs/<name>`, an adapter directory, or a HF model directory.
    type: f16 (default), bf16, f32, q8_0, q5_1, q5_0, q4_1 or q4_0 (quantised in Python by `gguf`;
      norms stay f32; in 4/5-bit files token_embd and output are q8_0).
    base: use this base model instead of the one the run names.
    """
    if type not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type {type!r}: expected one of {', '.join(GGUF_TYPES)}")
    weight_type, embed_type, file_type = GGUF_TYPES[type]
    src = resolve_source(run_or_adapter_or_model_dir, base=base)
    cfg = _check_supported(src)
    arch, permute = ARCHS[cfg["model_type"]]
    heads = cfg["num_attention_heads"]
    kv_heads = cfg.get("num_key_value_heads") or heads

    tokenizer = load_tokenizer(src)
    contract = load_contract(src)
    vocab = vocab_from_tokenizer(
        tokenizer, cfg["vocab_size"], contract, chat_template_for(contract, tokenizer)
    )
    vocab.pre = _source_gguf_pre(src) or vocab.pre
    plan = _plan(CheckpointReader(src.base_dir), cfg, arch, weight_type, embed_type)
    rope_freqs = _rope_freqs(cfg)

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(path=None, arch=arch)
    try:
        _write_hparams(writer, cfg, src, file_type)
        vocab.write(writer)
        for p in plan:
            # numpy order (out, in); the writer reverses it into GGUF's innermost-first order
            writer.add_tensor_info(
                p.name, p.shape, np.dtype(np.float32), _nbytes(p.shape, p.qtype), raw_dtype=p.qtype
            )
        if rope_freqs is not None:
            writer.add_tensor_info(
                "rope_freqs.weight",
                list(rope_freqs.shape),
                np.dtype(np.float32),
                rope_freqs.numel() * 4,
                raw_dtype=Q.F32,
            )
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        todo = iter(plan)
        nxt = next(todo, None)
        for key, t in iter_merged(src, device=device):
            if nxt is None or key != nxt.key:
                continue  # a tensor GGUF leaves out (tied head, rotary buffer)
            if permute and key.endswith(("q_proj.weight", "q_proj.bias")):
                t = permute_qk(t, heads)
            elif permute and key.endswith(("k_proj.weight", "k_proj.bias")):
                t = permute_qk(t, kv_heads)
            writer.write_tensor_data(_encode(t, nxt.qtype))
            nxt = next(todo, None)
        if nxt is not None:
            raise RuntimeError(f"GGUF export: tensor {nxt.key} was planned but never read")
        if rope_freqs is not None:
            writer.write_tensor_data(rope_freqs.numpy().astype(np.float32))
        writer.close()
        os.replace(tmp, out)
    finally:
        writer.close()
        if tmp.exists():
            tmp.unlink()
    return out
