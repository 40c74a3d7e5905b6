"""The adapter on disk in PEFT's format: `adapter_model.safetensors` + `adapter_config.json`.

Keys are `base_model.model.<module path>.lora_A.weight` / `.lora_B.weight`, as PEFT saves them, so PEFT,
transformers and vLLM read our adapters, and we read adapters PEFT wrote (LoRA only, safetensors only).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from fasttune.lora.apply import _linear_modules, apply_lora, lora_modules

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
PREFIX = "base_model.model."

# Config fields that change what the adapter computes and that we do not implement: (field, allowed values).
_UNSUPPORTED = (
    ("use_dora", (False, None)),
    ("bias", ("none", None)),
    ("fan_in_fan_out", (False, None)),
    ("lora_bias", (False, None)),
    ("modules_to_save", (None, [])),
    ("rank_pattern", ({}, None)),
    ("alpha_pattern", ({}, None)),
    ("layers_to_transform", (None,)),
    ("layer_replication", (None,)),
    ("trainable_token_indices", (None,)),
    ("target_parameters", (None, [])),
    ("use_qalora", (False, None)),
)


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP (`.module`) and torch.compile (`._orig_mod`), whose paths PEFT expects."""
    for attr in ("module", "_orig_mod"):
        while isinstance(getattr(model, attr, None), nn.Module):
            model = getattr(model, attr)
    return model


def _only(values: set, what: str) -> object:
    if len(values) != 1:
        raise ValueError(f"save_adapter: the LoRA layers disagree on {what} ({sorted(values)}); "
                         "PEFT's rank_pattern/alpha_pattern are not supported")
    return next(iter(values))


def _target_modules_field(model: nn.Module, adapted: list[str]) -> list[str] | str:
    """Last-name list if it selects exactly the adapted layers (PEFT's usual form), else a full-path regex."""
    short = sorted({n.rsplit(".", 1)[-1] for n in adapted})
    linear_paths = set(_linear_modules(model)) | set(adapted)
    selected = {n for n in linear_paths if n.rsplit(".", 1)[-1] in short}
    if selected == set(adapted):
        return short
    return "^(?:" + "|".join(re.escape(n) for n in adapted) + ")$"


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    *,
    base_model_name_or_path: str | None,
    r: int | None = None,
    lora_alpha: float | None = None,
    lora_dropout: float | None = None,
    target_modules: Iterable[str] | str | None = None,
    use_rslora: bool | None = None,
    revision: str | None = None,
    weights: Mapping[str, torch.Tensor] | None = None,
) -> Path:
    """Write the model's LoRA weights and a PEFT `adapter_config.json` into `out_dir`; return out_dir.

    `weights` (parameter name -> whole tensor) replaces the tensors read from the modules: the adapter of
    a model whose parameters are FSDP2 shards, gathered whole beforehand.

    r, lora_alpha, lora_dropout and use_rslora are read from the LoRA layers; when given they must agree.
    `target_modules` is accepted for symmetry with LoraConfig, but the file always records the modules
    that were actually adapted (names such as 'default' mean nothing to PEFT).
    """
    model = unwrap(model)
    mods = list(lora_modules(model))
    if not mods:
        raise ValueError("save_adapter: the model has no LoRA layers (call apply_lora first)")
    found = {
        "r": _only({m.r for _, m in mods}, "r"),
        "lora_alpha": _only({m.lora_alpha for _, m in mods}, "lora_alpha"),
        "lora_dropout": _only({getattr(m.lora_dropout, "p", 0.0) for _, m in mods}, "lora_dropout"),
        "use_rslora": _only({m.use_rslora for _, m in mods}, "use_rslora"),
    }
    given = {"r": r, "lora_alpha": lora_alpha, "lora_dropout": lora_dropout, "use_rslora": use_rslora}
    for key, value in given.items():
        if value is not None and value != found[key]:
            raise ValueError(f"save_adapter: {key}={value!r} but the model's LoRA layers have {found[key]!r}")
    del target_modules  # recorded from the model below

    adapted = [n for n, _ in mods]
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "auto_mapping": None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": revision,
        "inference_mode": True,
        "r": found["r"],
        "lora_alpha": found["lora_alpha"],
        "lora_dropout": found["lora_dropout"],
        "target_modules": _target_modules_field(model, adapted),
        "exclude_modules": None,
        "use_rslora": found["use_rslora"],
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "megatron_config": None,
        "megatron_core": "megatron.core",
        "trainable_token_indices": None,
        "loftq_config": {},
        "eva_config": None,
        "corda_config": None,
        "use_dora": False,
        "layer_replication": None,
        "lora_bias": False,
        "target_parameters": None,
    }
    tensors = {}
    for name, m in mods:
        for part in ("lora_A", "lora_B"):
            key = f"{name}.{part}.weight"
            w = weights[key] if weights is not None else getattr(m, part).weight
            tensors[f"{PREFIX}{key}"] = w.detach().to("cpu").contiguous()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, str(p), metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The adapter's config, checked for the LoRA features we implement; errors name the file and field."""
    path = Path(adapter_dir) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {adapter_dir}: not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type is {config.get('peft_type')!r}; only LORA adapters are read")
    for key, allowed in _UNSUPPORTED:
        if config.get(key) not in allowed:
            raise ValueError(f"{path}: {key}={config[key]!r} is not supported (expected {allowed[0]!r})")
    for key in ("r", "lora_alpha", "target_modules"):
        if key not in config:
            raise ValueError(f"{path}: missing field '{key}'")
    return config


def _targets_from_config(model: nn.Module, target_modules: list[str] | str) -> list[str] | str:
    if isinstance(target_modules, str) and target_modules != "all-linear":
        # PEFT's string form is a regular expression that must match the whole module path.
        paths = [n for n in _linear_modules(model) if re.fullmatch(target_modules, n)]
        if not paths:
            raise ValueError(f"adapter target_modules regex {target_modules!r} matches no linear layer")
        return paths
    return target_modules


def _strip_key(key: str) -> str:
    """`base_model.model.a.b.lora_A.weight` (or with a `.default` adapter name) -> `a.b.lora_A.weight`."""
    if key.startswith(PREFIX):
        key = key[len(PREFIX):]
    return re.sub(r"\.(lora_[AB])\.[^.]+\.weight$", r".\1.weight", key) if ".default." in key else key


def load_adapter(model: nn.Module, adapter_dir: str | Path) -> list[str]:
    """Read a PEFT LoRA adapter into `model` (applying LoRA first if it has none); return adapted paths."""
    adapter_dir = Path(adapter_dir)
    model = unwrap(model)
    config = read_adapter_config(adapter_dir)
    weights = adapter_dir / WEIGHTS_NAME
    if not weights.is_file():
        extra = " (adapter_model.bin is pickle; only safetensors are read)" if (
            adapter_dir / "adapter_model.bin").exists() else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {adapter_dir}{extra}")
    if not any(True for _ in lora_modules(model)):
        apply_lora(model, config["r"], config["lora_alpha"], config.get("lora_dropout") or 0.0,
                   target_modules=_targets_from_config(model, config["target_modules"]),
                   use_rslora=bool(config.get("use_rslora", False)))
    mods = dict(lora_modules(model))
    r, alpha = config["r"], config["lora_alpha"]
    scaling = alpha / r**0.5 if config.get("use_rslora") else alpha / r
    for name, m in mods.items():
        if abs(m.scaling - scaling) > 1e-12 * max(1.0, abs(scaling)):
            raise ValueError(f"{adapter_dir}: adapter scaling {scaling:g} differs from the model's LoRA "
                             f"layer {name} ({m.scaling:g}); r/lora_alpha/use_rslora disagree")

    state = {_strip_key(k): v for k, v in load_file(str(weights)).items()}
    params = {f"{n}.{ab}.weight": getattr(m, ab).weight 
              for n, m in mods.items() for ab in ("lora_A", "lora_B")}
    unexpected = sorted(set(state) - set(params))
    missing = sorted(set(params) - set(state))
    if unexpected or missing:
        raise ValueError(f"{weights}: adapter keys do not match the model's LoRA layers; "
                         f"unexpected {unexpected[:4]}{'…' if len(unexpected) > 4 else ''}, "
                         f"missing {missing[:4]}{'…' if len(missing) > 4 else ''}")
    with torch.no_grad():
        for key, p in params.items():
            if state[key].shape != p.shape:
                raise ValueError(f"{weights}: {key} has shape {tuple(state[key].shape)}, "
                                 f"the model expects {tuple(p.shape)}")
            p.copy_(state[key].to(device=p.device, dtype=p.dtype))
    return list(mods)
