"""The preference losses: DPO (sigmoid, and IPO), ORPO and KTO, as TRL defines them, and the objectives
that feed them log-probabilities from one forward over a micro-batch of `data/pair_batches.py`.

A sequence's log-probability is the sum over its completion tokens of log p(token | everything before).
With r = log pi(y|x) - log pi_ref(y|x) for chosen (c) and rejected (r) completions and `beta`:
    DPO   loss = -log sigmoid(beta (r_c - r_r))
    IPO   loss = (r_c / |c| - r_r / |r| - 1 / (2 beta))^2               (per-token averages, as TRL)
    ORPO  loss = NLL(chosen, whole sequence) - beta log sigmoid(log odds_c - log odds_r),
          odds = p / (1 - p) of the per-token average log-probability; no reference
    KTO   loss = w_d (1 - sigmoid(beta (r - z))) for desirable rows, w_u (1 - sigmoid(beta (z - r))) for
          undesirable ones; z = max(0, mean of r over mismatched prompt/completion pairs), no gradient
Logged as TRL does: rewards/chosen and rewards/rejected (beta r; ORPO: beta times the average
log-probability), rewards/margins, rewards/accuracies (chosen reward above rejected).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.lora.reference import Reference
from fasttune.train.logps import scored_index, sequence_counts, sequence_logps, token_logps

Batch = dict[str, torch.Tensor]
MODEL_KEYS = ("input_ids", "targets", "position_ids", "attention_mask")
DEFAULT_BETA = {"dpo": 0.1, "orpo": 0.1, "kto": 0.1}  # TRL's DPOConfig, ORPOConfig, KTOConfig


def dpo_loss(chosen: torch.Tensor, rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, loss_type: str = "sigmoid",
             chosen_tokens: torch.Tensor | None = None,
             rejected_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pair losses (n,) from sequence log-probabilities (n,) of the policy and the reference."""
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    if loss_type == "ipo":
        delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        return (delta - 1 / (2 * beta)) ** 2
    raise ValueError(f"loss_type {loss_type!r}: known are sigmoid and ipo")


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, switching forms at -log 2 to avoid cancellation."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_odds_ratio(chosen_avg: torch.Tensor, rejected_avg: torch.Tensor) -> torch.Tensor:
    """log sigmoid(log odds(chosen) - log odds(rejected)) per pair, from per-token average log-probs."""
    log_odds = (chosen_avg - rejected_avg) - (log1mexp(chosen_avg) - log1mexp(rejected_avg))
    return F.logsigmoid(log_odds)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, label: torch.Tensor, kl: torch.Tensor,
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> torch.Tensor:
    """Per-row weighted losses (n,); `kl` is the detached, clamped reference point z."""
    ratio = logps - ref_logps
    desirable = desirable_weight * (1 - torch.sigmoid(beta * (ratio - kl)))
    undesirable = undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratio)))
    return torch.where(label, desirable, undesirable)


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor, chosen: torch.Tensor,
                  rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the pairs (the loop divides by the pairs of the logging interval)."""
    return {"rewards/chosen": chosen_rewards.sum(), "rewards/rejected": rejected_rewards.sum(),
            "rewards/margins": (chosen_rewards - rejected_rewards).sum(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().sum(),
            "logps/chosen": chosen.detach().sum(), "logps/rejected": rejected.detach().sum(),
            # not TRL's: the share of pairs whose chosen completion is the more likely one under the policy
            "logps/accuracies": (chosen.detach() > rejected.detach()).float().sum()}


def _rows(batch: Batch, rows: slice) -> Batch:
    """The model's inputs of `rows`; `branch` where the pairs share their prompt (`data.pair_batches`), and
    the scored positions (`logps.scored_index`), found here once for the passes that read these rows, so
    that no pass waits for the GPU between its forward and the backward."""
    inputs = {k: batch[k][rows] for k in (*MODEL_KEYS, "branch") if k in batch}
    inputs["scored_index"] = scored_index(inputs["targets"])
    return inputs


class DPOObjective:
    """DPO or IPO on pairs; the reference is the base with the adapter off (or the starting adapter)."""

    per_token, unit = False, "pairs"

    def __init__(self, reference: Reference, beta: float = 0.1, loss_type: str = "sigmoid") -> None:
        self.reference, self.beta, self.loss_type = reference, beta, loss_type

    def units(self, batch: Batch) -> int:
        return int(batch["units"])

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n, inputs, seq = int(batch["units"]), _rows(batch, slice(None)), batch["sequence"]
        with torch.no_grad(), self.reference(model):  # before the policy forward: it may swap adapter values
            ref = sequence_logps(token_logps(model, inputs), seq, 2 * n)
        logps = sequence_logps(token_logps(model, inputs), seq, 2 * n)
        counts = sequence_counts(seq, 2 * n)
        chosen, rejected = logps[:n], logps[n:]
        losses = dpo_loss(chosen, rejected, ref[:n], ref[n:], self.beta, self.loss_type, counts[:n],
                          counts[n:])
        chosen_rewards = self.beta * (chosen.detach() - ref[:n])
        rejected_rewards = self.beta * (rejected.detach() - ref[n:])
        return losses.sum(), _pair_metrics(chosen_rewards, rejected_rewards, chosen, rejected)


class ORPOObjective:
    """ORPO on pairs collated with `whole_chosen`: no reference pass."""

    per_token, unit = False, "pairs"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = beta

    def units(self, batch: Batch) -> int:
        return int(batch["units"])

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n, seq, whole = int(batch["units"]), batch["sequence"], batch["whole"]
        token = token_logps(model, _rows(batch, slice(None)))  # (B, T)
        avg = sequence_logps(token, seq, 2 * n) / sequence_counts(seq, 2 * n).clamp(min=1)
        nll = -(token * whole).sum() / whole.sum().clamp(min=1)  # mean over the chosen sequences' tokens
        ratio = orpo_odds_ratio(avg[:n], avg[n:])
        loss = n * nll - (self.beta * ratio).sum()  # n x TRL's micro-batch mean: the loop divides by pairs
        chosen_rewards, rejected_rewards = self.beta * avg[:n].detach(), self.beta * avg[n:].detach()
        metrics = _pair_metrics(chosen_rewards, rejected_rewards, avg[:n], avg[n:])
        metrics.update({"nll_loss": n * nll.detach(), "log_odds_ratio": ratio.detach().sum()})
        return loss, metrics


class KTOObjective:
    """KTO on rows collated by `collate_unpaired` (matched rows, then the mismatched KL rows)."""

    per_token, unit = False, "rows"

    def __init__(self, reference: Reference, beta: float = 0.1, desirable_weight: float = 1.0,
                 undesirable_weight: float = 1.0) -> None:
        self.reference, self.beta = reference, beta
        self.weights = (desirable_weight, undesirable_weight)

    def units(self, batch: Batch) -> int:
        return int(batch["units"])

    def __call__(self, model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n, label = int(batch["units"]), batch["label"]
        # counted on the host before the forwards: after them, the count would wait for them to finish
        n_chosen, n_rejected = int(label.sum()), int((~label).sum())
        main, mismatched = _rows(batch, slice(0, n)), _rows(batch, slice(n, 2 * n))
        seq_main, seq_kl = batch["sequence"][:n], batch["sequence"][n:] - n * (batch["sequence"][n:] >= 0)
        with torch.no_grad(), self.reference(model):
            ref = sequence_logps(token_logps(model, main), seq_main, n)
            ref_kl = sequence_logps(token_logps(model, mismatched), seq_kl, n)
        with torch.no_grad():
            kl_logps = sequence_logps(token_logps(model, mismatched), seq_kl, n)
        kl = (kl_logps - ref_kl).mean().clamp(min=0)
        logps = sequence_logps(token_logps(model, main), seq_main, n)
        losses = kto_loss(logps, ref, label, kl, self.beta, *self.weights)
        rewards = self.beta * (logps.detach() - ref)
        # sums by `where`, not by picking rows with the mask (a host sync before the backward)
        chosen_sum, rejected_sum = torch.where(label, rewards, 0).sum(), torch.where(label, 0, rewards).sum()
        metrics = {"kl": (kl, 1), "rewards/chosen": (chosen_sum, n_chosen),
                   "rewards/rejected": (rejected_sum, n_rejected)}
        if n_chosen and n_rejected:  # TRL logs the margin of micro-batches holding both kinds
            margin = chosen_sum / n_chosen - rejected_sum / n_rejected
            metrics["rewards/margins"] = (margin, 1)
        return losses.sum(), metrics
