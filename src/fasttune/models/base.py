"""What every trainable model returns, whichever path (our Llama family or transformers + PEFT) runs it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100


@dataclass
class LMOutput:
    """`loss_sum`/`n_tokens` when targets were given (logits then None); `logits` otherwise."""

    logits: torch.Tensor | None = None
    loss_sum: torch.Tensor | None = None
    n_tokens: torch.Tensor | None = None
    kv_cache: object | None = None
