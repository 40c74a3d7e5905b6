"""What the training loop minimises: the loss of one micro-batch as a sum over its units, and how many
units the batch holds. The loop divides by the units of the whole accumulation window.

SFT's unit is the trained token (`TokenLoss`); the preference losses count pairs or rows
(`train/preference.py`), GRPO completions (`train/grpo.py`). Besides the loss, an objective returns
metric sums over the same units (e.g. "rewards/chosen"), or (sum, count) pairs for a mean over something
else (e.g. a reward per completion); `add_metrics` / `metric_means` turn them into the means the loop logs.
"""

from __future__ import annotations

from typing import Any, Protocol

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

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """(loss summed over the batch's units, fp32 and differentiable; {metric: sum over the units, or a
        (sum, count) pair})."""
        ...


def add_metrics(store: dict[str, list[float]], stats: dict[str, Any], units: int) -> None:
    """Add an objective's metrics to `store` ({name: [sum, count]}, JSON-serialisable for checkpoints): a
    plain value is a sum over the batch's `units`, a (sum, count) pair brings its own count."""
    for key, value in stats.items():
        total, count = value if isinstance(value, tuple) else (value, units)
        entry = store.setdefault(key, [0.0, 0.0])
        entry[0] += float(total)
        entry[1] += float(count)


def merge_metrics(store: dict[str, list[float]], other: dict[str, list[float]]) -> None:
    for key, (total, count) in other.items():
        entry = store.setdefault(key, [0.0, 0.0])
        entry[0] += total
        entry[1] += count


def metric_means(store: dict[str, list[float]]) -> dict[str, float]:
    """Each metric's sum over its count (metrics with nothing counted are left out)."""
    return {k: total / count for k, (total, count) in store.items() if count > 0}


class TokenLoss:
    """SFT: the summed cross-entropy of the trained tokens, from the model's fused loss."""

    per_token = True
    unit = "tokens"

    def units(self, batch: Batch) -> int:
        return int((batch["targets"] != IGNORE_INDEX).sum())

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        return model(**batch).loss_sum.float(), {}


class BatchMeanLoss:
    """transformers' evaluation loss: each batch's mean cross-entropy over its trained tokens, weighted by
    the batch's rows (sequences), as `Trainer.evaluate` repeats each batch's loss per row and averages
    over the rows. A batch without a trained token counts nothing, as transformers leaves its NaN out.
    Evaluation only: the loop trains on `TokenLoss`."""

    per_token = False
    unit = "rows"

    def units(self, batch: Batch) -> int:
        targets = batch["targets"]
        return int(targets.shape[0]) if bool((targets != IGNORE_INDEX).any()) else 0

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        out = model(**batch)
        n, rows = int(out.n_tokens), int(batch["targets"].shape[0])
        return (out.loss_sum.float() * (rows / n) if n else out.loss_sum.float() * 0), {}
