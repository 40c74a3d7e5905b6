"""Choosing the next token from logits: repetition penalty, temperature, top-k, top-p, min-p, then argmax or
a draw.

Each filter computes what the transformers logits processor of the same name computes, applied in
transformers' order (repetition penalty, temperature, top-k, top-p, min-p), so sampled runs match its
`generate` for the same seed-free distribution; tests compare each filter with the transformers class.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each token. `do_sample=False` is greedy (the penalty still applies, as in transformers)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    min_p: float = 0.0  # keep tokens at least min_p times as likely as the most likely one; 0 keeps all

    def __post_init__(self) -> None:
        if self.temperature <= 0 and self.do_sample:
            raise ValueError(f"temperature={self.temperature}: must be > 0 when do_sample=True")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 disables it)")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={self.repetition_penalty}: must be > 0 (1.0 disables it)")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p={self.min_p}: must be in [0, 1] (0 disables it)")


def apply_repetition_penalty(
    logits: torch.Tensor, seen_ids: torch.Tensor, penalty: float, seen_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Make every token already in the row less likely: negative logits * penalty, positive / penalty.

    logits: (B, V); seen_ids: (B, S) ids of the prompt and the tokens generated so far;
    seen_mask: (B, S) bool, False for left padding, whose ids must not count (transformers counts them,
    which makes a padded row differ from the same prompt alone).
    """
    if penalty == 1.0:
        return logits
    vocab = logits.shape[-1]
    hits = torch.ones_like(seen_ids, dtype=logits.dtype)
    if seen_mask is not None:
        hits = hits * seen_mask.to(logits.dtype)
    # Out-of-range ids (an embedding larger than the head) go to a spare column that is dropped after.
    present = torch.zeros(logits.shape[0], vocab + 1, dtype=logits.dtype, device=logits.device)
    present.scatter_add_(1, seen_ids.clamp(max=vocab), hits)
    present = present[:, :vocab] > 0  # (B, V)
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(present, penalised, logits)


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the `top_k` largest logits of each row (ties with the k-th kept too); 0 keeps all."""
    if top_k <= 0 or top_k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to more than `top_p`."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=False, dim=-1)  # ascending: (B, V)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop_sorted = cumulative <= (1.0 - top_p)
    drop_sorted[..., -1:] = False  # the most likely token always stays
    drop = drop_sorted.scatter(1, order, drop_sorted)  # back to vocabulary order
    return logits.masked_fill(drop, float("-inf"))


def apply_min_p(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep the tokens whose probability is at least `min_p` times the most likely token's (which always
    stays); 0 keeps all."""
    if min_p <= 0.0:
        return logits
    probs = logits.softmax(dim=-1)
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)
    drop.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    seen_ids: torch.Tensor | None = None,
    seen_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """All filters in transformers' order, on fp32 logits (B, V)."""
    logits = logits.float()
    if params.repetition_penalty != 1.0 and seen_ids is not None:
        logits = apply_repetition_penalty(logits, seen_ids, params.repetition_penalty, seen_mask)
    if params.do_sample:
        if params.temperature != 1.0:
            logits = logits / params.temperature
        logits = apply_top_k(logits, params.top_k)
        logits = apply_top_p(logits, params.top_p)
        logits = apply_min_p(logits, params.min_p)
    return logits


def pick_next(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, V) processed logits -> (B,) token ids: argmax, or one draw from the softmax."""
    if not params.do_sample:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
