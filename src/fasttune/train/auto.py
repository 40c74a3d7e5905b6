"""What `auto` means for learning_rate, lora_alpha and max_seq_length: values that suit the loaded model
and the data, each with the reason the run log prints.

learning_rate and lora_alpha act together: a LoRA update is scaled by lora_alpha / r (lora_alpha / sqrt(r)
with use_rslora), so the size of a step is learning_rate x scale. Auto sets that product from the model's
parameter count, interpolated on a log-log scale between common LoRA settings:

| parameters | learning_rate x scale | learning_rate, scale (auto alpha) |
|---|---|---|
| up to 150M | 1e-2 | 5e-3, 2 (the embedded 135M job: visible learning in minutes on a CPU) |
| 8B | 2e-4 | 2e-4, 1 (the usual LoRA/QLoRA setting for 7-8B models) |
| 33B and more | 1e-4 | 1e-4, 1 (the QLoRA paper's setting for 33B and 65B) |

Auto lora_alpha is 2 x r below 1B parameters and r from 1B up; a lora_alpha that is set is kept and auto
learning_rate divides by its scale, so the step size stays the one above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# (parameters, learning_rate x LoRA scale): anchors of the log-log interpolation
STEP_ANCHORS = ((150e6, 1e-2), (8e9, 2e-4), (33e9, 1e-4))
SMALL_MODEL = 1e9  # auto lora_alpha is 2 x r below this many parameters, r from here up
# auto max_seq_length: the longest example rounded up to this multiple, at most AUTO_MAX_LEN tokens
LENGTH_MULTIPLE = 256
AUTO_MAX_LEN = 4096


@dataclass(frozen=True)
class LearningRateChoice:
    learning_rate: float
    lora_alpha: int
    reason: str


@dataclass(frozen=True)
class LengthChoice:
    max_seq_length: int
    reason: str


def step_size(n_params: float) -> float:
    """learning_rate x LoRA scale for a model of n_params parameters (STEP_ANCHORS, log-log)."""
    (n0, s0), *_ = STEP_ANCHORS
    if n_params <= n0:
        return s0
    for (n_a, s_a), (n_b, s_b) in zip(STEP_ANCHORS, STEP_ANCHORS[1:]):
        if n_params <= n_b:
            t = math.log(n_params / n_a) / math.log(n_b / n_a)
            return math.exp(math.log(s_a) + t * (math.log(s_b) - math.log(s_a)))
    return STEP_ANCHORS[-1][1]


def _two_digits(x: float) -> float:
    """x rounded to two significant digits, so that the chosen value reads cleanly in the log and run.yaml."""
    return float(f"{x:.2g}")


def choose_learning_rate(n_params: int, r: int, lora_alpha: int | str, learning_rate: float | str,
                         use_rslora: bool = False) -> LearningRateChoice:
    """Resolve 'auto' in learning_rate and/or lora_alpha for a model of n_params parameters."""
    denominator = math.sqrt(r) if use_rslora else r
    notes = []
    if lora_alpha == "auto":
        factor = 2 if n_params < SMALL_MODEL else 1
        alpha = factor * r if not use_rslora else max(1, round(factor * math.sqrt(r)))
        notes.append(f"lora_alpha {alpha:g} (scale {alpha / denominator:g}: "
                     f"{'2 x r below' if factor == 2 else 'r from'} 1B parameters)")
    else:
        alpha = lora_alpha
    scale = alpha / denominator
    if learning_rate == "auto":
        step = step_size(n_params)
        lr = _two_digits(step / scale)
        notes.insert(0, f"learning_rate {lr:g} (a step of learning_rate x scale = {step:.2g} for "
                        f"{_count(n_params)} parameters)")
    else:
        lr = float(learning_rate)
    return LearningRateChoice(lr, alpha, "auto: " + ", ".join(notes))


def choose_max_seq_length(longest: int, context: int | None) -> LengthChoice:
    """max_seq_length 'auto': the longest example (already cut at `auto_length_cap(context)`) rounded up
    to a multiple of LENGTH_MULTIPLE, never past the cap."""
    cap = auto_length_cap(context)
    chosen = min(cap, LENGTH_MULTIPLE * max(1, math.ceil(longest / LENGTH_MULTIPLE)))
    ctx = f"the model's context is {context}" if context else "the model states no context length"
    reason = (f"auto: max_seq_length {chosen} (the longest training example has {longest} tokens, rounded up "
              f"to a multiple of {LENGTH_MULTIPLE}; at most {cap}: {ctx}, auto stops at {AUTO_MAX_LEN})")
    return LengthChoice(chosen, reason)


def auto_length_cap(context: int | None) -> int:
    """The longest max_seq_length auto chooses: the model's context, at most AUTO_MAX_LEN."""
    return min(context, AUTO_MAX_LEN) if context else AUTO_MAX_LEN


def _count(n: float) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def parameter_count(hf_config: Any, trust_remote_code: bool = False) -> int:
    """The parameter count of the model a transformers config describes.

    It builds the model on the meta device (no memory, no weights read), so the count is exact for any
    architecture transformers knows, whether the checkpoint is quantised or not.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in model.parameters())


def context_length(hf_config: Any) -> int | None:
    """The longest sequence the model's config states (max_position_embeddings or its older names)."""
    text = hf_config.get_text_config() if hasattr(hf_config, "get_text_config") else hf_config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
