"""Log-probabilities of the trained tokens, per token and summed per sequence, for the preference and RL
losses (SFT needs only their sum over the batch, which the model's fused cross-entropy gives).

The batch follows the contract of docs/ARCHITECTURE.md (`targets` already shifted, -100 where nothing is
scored). On our Llama-family model the head runs only at scored positions, a chunk of them at a time under
activation checkpointing, so the (tokens x vocab) logits of a whole batch never exist at once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fasttune.models.base import IGNORE_INDEX

CHUNK_ELEMS = 1 << 24  # logits per head chunk: 16M fp32 values (64 MiB), e.g. 341 rows of a 49k vocabulary
# Each chunk reads the whole head weight (vocabulary x hidden); under about 256 rows that read, not the
# arithmetic, bounds the product on an H100, so a chunk takes at least this many rows (a 128k vocabulary:
# 128 MiB of fp32 logits).
CHUNK_ROWS_MIN = 256


def _chunk_logps(h: torch.Tensor, head: torch.nn.Module, y: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = head(h).float()  # (n, V)
    if temperature != 1.0:
        logits = logits / temperature
    return -F.cross_entropy(logits, y, reduction="none")  # (n,)


def scored_index(targets: torch.Tensor) -> torch.Tensor:
    """(N,) the flat positions of `targets` (B, T) that are scored (not -100), in order. The objectives find
    them once, before their forwards (`preference._rows`, `grpo`), and pass them in the batch as
    `scored_index`: `token_logps` then knows N from the index's shape, where picking the positions by the
    mask after the forward would wait for the GPU to finish it before sizing the result, and the backward
    could not be queued ahead of it."""
    return (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def token_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                temperature: float = 1.0) -> torch.Tensor:
    """(B, T) fp32: log p(targets[b, t] | tokens up to t) where targets != -100, else 0.

    `temperature` divides the logits first (GRPO scores completions at its sampling temperature, as TRL).
    `batch["scored_index"]`, where present, is `scored_index(targets)`.
    """
    input_ids, targets = batch["input_ids"], batch["targets"]
    position_ids, attention_mask = batch.get("position_ids"), batch.get("attention_mask")
    branch = batch.get("branch")  # rows sharing tokens (`data.pair_batches`)
    index = batch.get("scored_index")
    if index is None:
        index = scored_index(targets)  # a host sync on CUDA
    B, T = targets.shape
    y = targets.reshape(-1).index_select(0, index)  # (N,)
    hidden_states = getattr(model, "hidden_states", None)  # our Llama family; not transformers' models
    if hidden_states is not None:
        h = hidden_states(input_ids, position_ids, attention_mask, branch)  # (B, T, H)
        hk = h.reshape(B * T, h.shape[-1]).index_select(0, index)  # (N, H)
        vocab = model.lm_head.out_features
        step = max(CHUNK_ROWS_MIN, CHUNK_ELEMS // vocab)
        parts = []
        for a in range(0, y.numel(), step):
            if torch.is_grad_enabled():
                parts.append(checkpoint(_chunk_logps, hk[a:a + step], model.lm_head, y[a:a + step],
                                        temperature, use_reentrant=False))
            else:
                parts.append(_chunk_logps(hk[a:a + step], model.lm_head, y[a:a + step], temperature))
        logps = torch.cat(parts) if parts else hk.new_zeros(0, dtype=torch.float32)
    else:  # the generic transformers path: its forward gives the logits of the whole batch
        if branch is not None:
            raise ValueError("token_logps: rows that share tokens (branch) need fasttune's Llama-family "
                             "model")
        logits = model(input_ids, position_ids=position_ids, attention_mask=attention_mask).logits
        logits = logits.reshape(B * T, logits.shape[-1]).index_select(0, index).float()  # (N, V)
        if temperature != 1.0:
            logits = logits / temperature
        logps = -F.cross_entropy(logits, y, reduction="none")
    out = torch.zeros(B * T, dtype=torch.float32, device=targets.device)
    return out.index_copy(0, index, logps).view(B, T)


def sequence_logps(token: torch.Tensor, sequence: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) sums of `token` (B, T) grouped by `sequence` (B, T): the index of the scored sequence each
    position belongs to, -1 where none. Packed rows of one batch row carry different indices."""
    index = sequence.clamp(min=0).reshape(-1)
    values = torch.where(sequence >= 0, token, torch.zeros_like(token)).reshape(-1)
    return torch.zeros(n, dtype=token.dtype, device=token.device).index_add(0, index, values)


def sequence_counts(sequence: torch.Tensor, n: int) -> torch.Tensor:
    """(n,) the number of scored tokens of each sequence."""
    ones = (sequence >= 0).to(torch.float32).reshape(-1)
    index = sequence.clamp(min=0).reshape(-1)
    return torch.zeros(n, dtype=torch.float32, device=sequence.device).index_add(0, index, ones)
