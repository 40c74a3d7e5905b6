"""bitsandbytes quantisation of our model's frozen linear layers: NF4 (QLoRA), 8-bit, and `*-bnb-4bit` files.

bitsandbytes is imported only here and only when asked for (it needs CUDA). The output head and the
embeddings stay in 16-bit, as in QLoRA. The generic path asks transformers for the same thing through
`bnb_config`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn as nn

SKIP = ("lm_head",)
INSTALL_HINT = "pip install 'bitsandbytes>=0.45' (a CUDA GPU is required)"


def quantization_mode(load_in_4bit: bool, load_in_8bit: bool, load_in_fp8: bool = False) -> str | None:
    return "4bit" if load_in_4bit else "8bit" if load_in_8bit else "fp8" if load_in_fp8 else None


def prequantized_mode(hf_config: Any) -> str | None:
    """'4bit'/'8bit' when config.json carries a bitsandbytes quantization_config (`*-bnb-4bit` repos)."""
    qc = getattr(hf_config, "quantization_config", None)
    if qc is None:
        return None
    qc = qc if isinstance(qc, Mapping) else qc.to_dict()
    if qc.get("quant_method") != "bitsandbytes":
        raise ValueError(
            f"quantization_config with quant_method={qc.get('quant_method')!r} is not supported "
            "(only bitsandbytes pre-quantised checkpoints are)"
        )
    return "4bit" if qc.get("load_in_4bit") else "8bit" if qc.get("load_in_8bit") else None


def import_bnb():
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ImportError(f"4-bit/8-bit loading needs bitsandbytes: {INSTALL_HINT}")
    import bitsandbytes as bnb

    return bnb


def bnb_config(mode: str, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for the generic path, with the same choices as `quantize_linears`."""
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            llm_int8_skip_modules=list(SKIP),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=list(SKIP))


def _targets(model: nn.Module, skip: Iterable[str]) -> list[str]:
    skip = tuple(skip)
    return [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rsplit(".", 1)[-1] not in skip]


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, new)


@torch.no_grad()
def quantize_linears(
    model: nn.Module,
    mode: str,
    device: torch.device | str,
    compute_dtype: torch.dtype,
    skip: Iterable[str] = SKIP,
) -> list[str]:
    """Replace each plain nn.Linear (weights loaded, on the CPU) by a bitsandbytes layer on `device`.

    Quantisation happens as each layer moves to the GPU, so the 16-bit model never sits there whole.
    4bit: NF4 with double quantisation and `compute_dtype` matmuls; 8bit: LLM.int8() without fp16 copy.
    """
    bnb = import_bnb()
    names = _targets(model, skip)
    for name in names:
        lin = model.get_submodule(name)
        has_bias = lin.bias is not None
        if mode == "4bit":
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=has_bias,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(
                lin.weight.data.to(compute_dtype),
                requires_grad=False,
                compress_statistics=True,
                quant_type="nf4",
                module=q,
            )
        elif mode == "8bit":
            q = bnb.nn.Linear8bitLt(
                lin.in_features,
                lin.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=6.0,
                device="meta",
            )
            q.weight = bnb.nn.Int8Params(lin.weight.data, requires_grad=False, has_fp16_weights=False)
        else:
            raise ValueError(f"quantisation mode {mode!r}: expected '4bit' or '8bit'")
        if has_bias:
            q.bias = nn.Parameter(lin.bias.data, requires_grad=False)
        _swap(model, name, q.to(device))  # bitsandbytes quantises on this move
    return names


def prequantized_linear_names(keys: Iterable[str]) -> set[str]:
    """Module paths whose weights are stored in 4 bits (a `weight.quant_state.bitsandbytes__*` entry)."""
    return {k.split(".weight.quant_state.")[0] for k in keys if ".weight.quant_state.bitsandbytes__" in k}


@torch.no_grad()
def load_prequantized_4bit(
    model: nn.Module,
    name: str,
    state: Mapping[str, torch.Tensor],
    device: torch.device | str,
    compute_dtype: torch.dtype,
) -> list[str]:
    """Install the stored NF4/FP4 weight of linear `name` as a Linear4bit on `device`; return the keys used.

    `state` holds at least `name.weight` (packed uint8) and its `name.weight.*` statistics (absmax,
    quant_map, nested_*, quant_state.bitsandbytes__nf4), as bitsandbytes saves them.
    """
    bnb = import_bnb()
    lin = model.get_submodule(name)
    prefix = f"{name}.weight."
    stats = {k: v for k, v in state.items() if k.startswith(prefix)}
    q = bnb.nn.Linear4bit(
        lin.in_features,
        lin.out_features,
        bias=lin.bias is not None,
        compute_dtype=compute_dtype,
        device="meta",
    )
    q.weight = bnb.nn.Params4bit.from_prequantized(
        data=state[f"{name}.weight"],
        quantized_stats=dict(stats),
        requires_grad=False,
        device=device,
        module=q,
    )
    used = [f"{name}.weight", *stats]
    if lin.bias is not None:  # biases are stored in 16-bit; the loader has usually put it on `lin` already
        bias = state.get(f"{name}.bias", lin.bias)
        if bias.is_meta:
            raise ValueError(f"pre-quantised checkpoint: {name}.bias is missing")
        q.bias = nn.Parameter(bias.to(device=device, dtype=compute_dtype), requires_grad=False)
        used += [f"{name}.bias"] if f"{name}.bias" in state else []
    _swap(model, name, q)
    return used
