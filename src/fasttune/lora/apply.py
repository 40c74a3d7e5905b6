"""`apply_lora`: replace the targeted `nn.Linear` children of our model by `LoRALinear` and freeze the rest.

Target names follow PEFT/Unsloth: 'default' (the seven Llama projections), 'all-linear' (every linear
layer but the output head), or explicit names matched against a module's last name component
(`q_proj`) or a dotted suffix of its path (`self_attn.q_proj`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
import torch.nn as nn

from fasttune.lora.layer import LoRALinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUTPUT_HEADS = ("lm_head",)


def _linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every plain (or bitsandbytes) linear layer by path, skipping those already inside a LoRALinear."""
    found: dict[str, nn.Linear] = {}
    inside_lora: set[str] = set()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            inside_lora.add(name + ".")
            continue
        if isinstance(module, nn.Linear) and not any(name.startswith(p) for p in inside_lora):
            found[name] = module
    return found


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def resolve_targets(model: nn.Module, target_modules: Iterable[str] | str) -> list[str]:
    """Paths of the linear layers that `target_modules` selects; errors name unknown targets."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError("target_modules is empty; use 'default', 'all-linear' or names such as q_proj")
    linears = _linear_modules(model)
    candidates = {n: m for n, m in linears.items() if n.rsplit(".", 1)[-1] not in OUTPUT_HEADS}
    chosen: set[str] = set()
    unknown: list[str] = []
    for target in targets:
        if target == "all-linear":
            chosen.update(candidates)
            continue
        names = DEFAULT_TARGETS if target == "default" else (target,)
        for t in names:
            hits = [n for n in candidates if _matches(n, t)]
            if not hits and target != "default":
                unknown.append(t)
            chosen.update(hits)
    if unknown or not chosen:
        available = sorted({n.rsplit(".", 1)[-1] for n in candidates})
        what = f"unknown target_modules {unknown}" if unknown else f"target_modules {targets} matched nothing"
        raise ValueError(f"{what}; linear layers in this model: {', '.join(available) or 'none'}")
    return [n for n in linears if n in chosen]  # in model order, so the seeded init is reproducible


def apply_lora(
    model: nn.Module,
    r: int,
    lora_alpha: float,
    lora_dropout: float = 0.0,
    target_modules: Iterable[str] | str = ("default",),
    use_rslora: bool = False,
    random_state: int = 3407,
    *,
    adapter_dtype: torch.dtype | None = None,
) -> list[str]:
    """Wrap the targeted linear layers in `LoRALinear`, freeze every other parameter; return the paths.

    The init of every lora_A comes from one CPU generator seeded with `random_state`, in model order, so
    the same call gives the same adapters whatever the global RNG state or device: the A matrices that PEFT
    draws after `torch.manual_seed(random_state)` (as Unsloth's get_peft_model seeds it).
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("this model already has LoRA adapters; apply_lora once per model")
    names = resolve_targets(model, target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(random_state)
    use_kernels = bool(getattr(model, "use_kernels", False))  # follow the model's fast-path switch
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        layer = LoRALinear(getattr(parent, child), r, lora_alpha, lora_dropout, use_rslora,
                           adapter_dtype=adapter_dtype, generator=generator)
        layer.use_kernels = use_kernels
        setattr(parent, child, layer)
    return names


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter weights (every lora_A and lora_B), in model order."""
    return [p for _, m in lora_modules(model) for p in (m.lora_A.weight, m.lora_B.weight)]


def _numel(p: torch.Tensor) -> int:
    # bitsandbytes packs two 4-bit values per byte; count the weights the layer represents.
    return p.numel() * 2 if type(p).__name__ == "Params4bit" else p.numel()


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights counted once."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = _numel(p)
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total

