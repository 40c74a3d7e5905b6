"""What the training loop minimises: the loss of one micro-batch as a sum over its units, and how many
units the batch holds. The loop divides by the units of the whole accumulation window.

SFT's unit is the trained token (`TokenLoss`); the preference losses count pairs or rows
(`train/preference.py`), GRPO completions (`train/grpo.py`). Besides the loss, an objective returns
metric sums over the same units (e.g. "rewards/chosen"); the loop logs each divided by the units.
"""

from __future__ import annotations

from typing import Protocol

import torch

from fasttune.models.base import IGNORE_INDEX

Batch = dict[str, torch.Tensor]


class Objective(Protocol):
    # True when the loss is a mean token cross-entropy, so that perplexity means something
    per_token: bool
    unit: str  # what `units` counts, for the log: tokens, pairs, rows, completions

    def units(self, batch: Batch) -> int:
        """How many units (tokens, pairs, rows) the batch's loss sums over; read before any forward."""
        ...

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss summed over the batch's units, fp32 and differentiable; {metric: sum over the units})."""
        ...


class TokenLoss:
    """SFT: the summed cross-entropy of the trained tokens, from the model's fused loss."""

    per_token = True
    unit = "tokens"

    def units(self, batch: Batch) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return model(**batch).loss_sum.float(), {}
