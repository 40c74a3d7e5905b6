"""GRPO's advantages and loss, as TRL's GRPOTrainer defines them (its default `dapo` aggregation, and `grpo`).

For each prompt, G completions are sampled (train/rollout.py) and scored; with r the weighted sum of the
reward functions, the advantage of completion i of its group is
    A_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)          (std with Bessel's correction)
Per completion token t, with ratio rho = pi(t) / pi_old(t) (1 on the first pass over a batch):
    loss_t = -min(rho A, clip(rho, 1 - eps, 1 + eps) A) + beta rho KL_t,
    KL_t = exp(ref_t - logp_t) - (ref_t - logp_t) - 1            (reference: the adapter off)
`dapo` averages loss_t over every completion token of the accumulation window (the loop's unit is the token);
`grpo` averages over each completion's tokens, then over completions (the unit is the completion).
Logged: reward (mean and std over completions), per reward function its mean and std, completion lengths,
the share of completions cut at max_completion_length, KL, and the share of clipped tokens.
"""

from __future__ import annotations

import math

import torch

from fasttune.lora.reference import Reference
from fasttune.train.logps import scored_index, token_logps

Batch = dict[str, torch.Tensor]
MODEL_KEYS = ("input_ids", "targets", "position_ids", "attention_mask")


def group_advantages(rewards: torch.Tensor, group: int) -> torch.Tensor:
    """(n,) -> (n,): each reward minus its group's mean, over the group's std + 1e-4 (NaN rewards ignored)."""
    grouped = rewards.view(-1, group)  # (prompts, G)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    count = (~torch.isnan(grouped)).sum(dim=1, keepdim=True)
    var = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), torch.full_like(var, math.nan))
    return torch.nan_to_num((grouped - mean) / (std + 1e-4), nan=0.0).view(-1)


def combine_rewards(per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n, F) rewards of each function (NaN: no reward) -> (n,) their weighted sum, NaN ignored."""
    return (per_func * weights).nansum(dim=1)


def _std(x: torch.Tensor) -> torch.Tensor:
    x = x[~torch.isnan(x)]
    return x.std() if x.numel() > 1 else x.new_zeros(())


class GRPOObjective:
    """The clipped policy-gradient loss on a micro-batch of sampled completions (keys of train/rollout.py:
    the batch contract, `advantages` (B,), `rewards` (B, F) per function, `reward_total` (B,) their weighted
    sum, `truncated` (B,), and `old_logps` (B, T) when a batch is optimised more than once)."""

    per_token = False

    def __init__(self, reference: Reference | None, beta: float = 0.0, epsilon: float = 0.2,
                 loss_type: str = "dapo", temperature: float = 1.0, reward_names: tuple[str, ...] = ()):
        if loss_type not in ("dapo", "grpo"):
            raise ValueError(f"loss_type {loss_type!r}: known for grpo are dapo and grpo")
        self.reference, self.beta, self.epsilon = reference, beta, epsilon
        self.loss_type, self.temperature, self.reward_names = loss_type, temperature, reward_names
        self.unit = "completion tokens" if loss_type == "dapo" else "completions"

    def units(self, batch: Batch) -> int:
        mask = batch["targets"] != -100
        return int(mask.sum()) if self.loss_type == "dapo" else int(mask.any(dim=1).sum())

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict]:
        inputs = {k: batch[k] for k in MODEL_KEYS}
        inputs["scored_index"] = scored_index(batch["targets"])  # once for both passes (`logps.scored_index`)
        mask = (batch["targets"] != -100).float()  # (B, T)
        # the reward metrics count on the host: here, not after the forwards, where counting waits for them
        metrics: dict = self._reward_metrics(batch, mask)
        ref = None
        if self.beta != 0.0:
            with torch.no_grad(), self.reference(model):
                ref = token_logps(model, inputs, self.temperature)
        logps = token_logps(model, inputs, self.temperature)  # (B, T)
        old = batch["old_logps"] if "old_logps" in batch else logps.detach()
        ratio = torch.exp(logps - old)
        adv = batch["advantages"].unsqueeze(1)  # (B, 1)
        clipped = torch.clamp(ratio, 1 - self.epsilon, 1 + self.epsilon)
        per_token = -torch.min(ratio * adv, clipped * adv)
        n_tokens = mask.sum()
        if ref is not None:
            kl = torch.exp(ref - logps) - (ref - logps) - 1
            per_token = per_token + self.beta * kl * ratio  # TRL's bias-corrected KL term
            metrics["kl"] = ((kl.detach() * mask).sum(), n_tokens)
        if self.loss_type == "dapo":
            loss = (per_token * mask).sum()
        else:
            loss = ((per_token * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)).sum()
        is_clipped = ((ratio < 1 - self.epsilon) & (adv < 0)) | ((ratio > 1 + self.epsilon) & (adv > 0))
        metrics["clip_ratio"] = ((is_clipped.float() * mask).sum(), n_tokens)
        return loss, metrics

    def _reward_metrics(self, batch: Batch, mask: torch.Tensor) -> dict:
        """(sum, count) pairs, so that the loop reports means over completions; stds are per micro-batch."""
        per_func, total, n = batch["rewards"], batch["reward_total"], batch["rewards"].shape[0]
        out = {"reward": (total.nansum(), n), "reward_std": (_std(total), 1),
               "completions/mean_length": (mask.sum(), n),
               "completions/clipped_ratio": (batch["truncated"].float().sum(), n)}
        for k, name in enumerate(self.reward_names):
            values = per_func[:, k]
            out[f"rewards/{name}/mean"] = (values.nansum(), int((~torch.isnan(values)).sum()))
            out[f"rewards/{name}/std"] = (_std(values), 1)
        return out
