"""`export_gguf`: base + LoRA (or a model directory) -> one GGUF file for llama.cpp and Ollama, from Python.

No llama.cpp build: the `gguf` package writes the file. Tensors stream one at a time (merged in fp32,
then cast or quantised), in llama.cpp's names, rewritten as llama.cpp's `convert_hf_to_gguf.py` does for
each architecture (gguf_arch.py). The type of each tensor comes from quant_mix.py, K-quant blocks from
kquants.py. The metadata carries the hyperparameters, the tokenizer and the run's chat template and stop ids.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch

from fasttune.export import kquants
from fasttune.export.checkpoint import CheckpointReader, logical_specs
from fasttune.export.contract import chat_template_for, load_contract, load_tokenizer
from fasttune.export.gguf_arch import (
    ARCHS,
    CONV1D_WEIGHTS,
    LLAMA,
    Arch,
    GGUFExportError,
    arch_for,
    n_layers,
    permute_qk,
)
from fasttune.export.gguf_tokenizer import vocab_from_tokenizer
from fasttune.export.imatrix import ImportanceMatrix, collect_imatrix
from fasttune.export.quant_mix import GGUF_TYPES, OWN_QUANTIZER, tensor_types
from fasttune.export.source import ExportSource, iter_merged, resolve_source

Q = gguf.GGMLQuantizationType
_ARCH_ENUM = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
__all__ = ["ARCHS", "GGUF_TYPES", "GGUFExportError", "export_gguf", "gguf_supported", "permute_qk"]


@dataclass
class _Planned:
    key: str  # base checkpoint key
    name: str  # GGUF tensor name
    shape: list[int]  # torch shape (out, in) as llama.cpp reads it
    qtype: Q


def gguf_supported(src: ExportSource) -> Arch:
    """The GGUF architecture of the source's base model; raises GGUFExportError before any work if none."""
    return arch_for(src.hf_config)


def _plan(reader: CheckpointReader, cfg: dict, arch: Arch, type_name: str) -> list[_Planned]:
    n = n_layers(cfg)
    name_map = gguf.get_tensor_name_map(_ARCH_ENUM[arch.name], n)
    tied = bool(cfg.get("tie_word_embeddings", arch.name in ("gpt2", "gemma")))
    planned = []
    for key, (shape, _) in logical_specs(reader).items():
        if key.endswith(arch.skip) or (tied and key == "lm_head.weight"):
            continue
        stem, _, suffix = key.rpartition(".")
        name = name_map.get_name(stem)
        if name is None:
            raise GGUFExportError(
                f"GGUF export: no llama.cpp name for tensor {key!r} of this {arch.name} model"
            )
        if arch.name == "gpt2" and key.endswith(CONV1D_WEIGHTS):
            shape = shape[::-1]  # written transposed
        planned.append(_Planned(key, f"{name}.{suffix}", list(shape), Q.F32))
    types = tensor_types(type_name, [(p.name, tuple(p.shape)) for p in planned], n)
    for p in planned:
        p.qtype = types[p.name]
    return planned


def _nbytes(shape: list[int], qtype: Q) -> int:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    return math.prod(shape) // block * size


def _encode(t: torch.Tensor, qtype: Q, device: str, importance: torch.Tensor | None = None) -> np.ndarray:
    if qtype in OWN_QUANTIZER or (importance is not None and qtype in kquants.WITH_IMPORTANCE):
        return kquants.quantize(t.to(device), qtype, importance)
    a = t.detach().to(torch.float32).cpu().numpy()
    if qtype == Q.F32:
        return a
    if qtype == Q.F16:
        return a.astype(np.float16)
    return gguf.quants.quantize(a, qtype)


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
    imatrix: int | ImportanceMatrix | None = None,
) -> Path:
    """Write a GGUF file of the merged model. Returns `out_file`.

    run_or_adapter_or_model_dir: `runs/<name>`, an adapter directory, or a HF model directory.
    type: f16 (default), bf16, f32, q8_0, q5_1, q5_0, q4_1, q4_0 (quantised by the `gguf` package; in
      4/5-bit files token_embd and output are q8_0), or a K-quant mix q6_k, q5_k_m, q4_k_m, q4_k_s,
      q3_k_m (fasttune's quantizer, llama.cpp's type per tensor: see export/quant_mix.py). Norms stay f32.
    base: use this base model instead of the one the run names.
    device: where the LoRA products and the K-quant search run (cpu or cuda).
    imatrix: for a K-quant mix, the number of training rows to collect an importance matrix on (imatrix.py),
      or one already collected; the K-quant tensors and their Q5_0/Q5_1/IQ4_NL fallbacks are then
      quantized with it, and the metadata records it (quantize.imatrix.*).
    """
    if type not in GGUF_TYPES:
        raise GGUFExportError(f"GGUF type {type!r}: expected one of {', '.join(GGUF_TYPES)}")
    if imatrix is not None and GGUF_TYPES[type].mix is None:
        mixes = ", ".join(name for name, spec in GGUF_TYPES.items() if spec.mix)
        raise GGUFExportError(f"--imatrix: applies to the K-quant types ({mixes}), not --type {type}")
    src = resolve_source(run_or_adapter_or_model_dir, base=base)
    arch = gguf_supported(src)
    cfg = src.hf_config
    if isinstance(imatrix, int):
        imatrix = collect_imatrix(src, arch, imatrix, device=device)
    importance = imatrix.values if imatrix is not None else {}

    tokenizer = load_tokenizer(src)
    contract = load_contract(src)
    template = chat_template_for(contract, tokenizer)
    vocab = vocab_from_tokenizer(tokenizer, cfg["vocab_size"], contract, template)
    vocab.pre = _source_gguf_pre(src) or vocab.pre
    plan = _plan(CheckpointReader(src.base_dir), cfg, arch, type)
    rope_freqs = _rope_freqs(cfg) if arch is LLAMA else None

    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    writer = gguf.GGUFWriter(path=None, arch=arch.name)
    try:
        writer.add_name(src.run_dir.name if src.run_dir is not None else Path(src.base_name).name)
        writer.add_type(gguf.GGUFType.MODEL)
        arch.hparams(writer, cfg)
        writer.add_file_type(int(GGUF_TYPES[type].file_type))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for key, value in (imatrix.metadata() if imatrix is not None else {}).items():
            (writer.add_string if isinstance(value, str) else writer.add_int32)(key, value)
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
            t = arch.rewrite(key, t, cfg)
            imp = importance.get(nxt.name)
            if imp is not None and imp.shape[0] != t.shape[-1]:
                raise GGUFExportError(
                    f"--imatrix: {nxt.name} has {t.shape[-1]} input columns but the importance matrix "
                    f"holds {imp.shape[0]}"
                )
            writer.write_tensor_data(_encode(t, nxt.qtype, device, imp))
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
