"""Padded training batches run padding-free: the real tokens of every row in one packed row.

A right-padded batch (B, T) of rows that each start at position 0 becomes one sequence of its N real tokens,
positions restarting at each row, so that the model's packed-row attention (`models.attention`, case (b))
keeps every token inside its own row, as the padded batch's causal mask did:
```
input_ids   a a a . .        position_ids  0 1 2 . .        ->   a a a b b b b     position_ids  0 1 2 0 1 2 3
            b b b b .                      0 1 2 3 .
```
The loss sums the same targets over the same tokens, so it is the padded batch's (up to the order of fp32
sums); the pads' share of the products and of the attention is not computed. Hidden states for the
preference and RL log-probabilities (`hidden_states`) go back to the padded layout (`repad`). N is rounded
up to a multiple of 16 with pad tokens in a row of their own and no targets, so the kernels, which Triton
compiles apart for lengths that 16 divides and those it does not, see one kind of length.
"""

from __future__ import annotations

import torch

from fasttune.models.attention import right_padded
from fasttune.models.base import IGNORE_INDEX

MULTIPLE = 16


def unpad_rows(input_ids: torch.Tensor, position_ids: torch.Tensor | None, attention_mask: torch.Tensor,
               targets: torch.Tensor | None = None) -> tuple[torch.Tensor, ...] | None:
    """(keep, input_ids, position_ids[, targets]): `keep` (B, T) marks the real tokens, the others are
    (1, N') of them; or None where the batch has no padding, is not right-padded, or has a row that does not
    start at position 0 (one host sync)."""
    keep = attention_mask.bool()
    if position_ids is None:
        position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device)
                        .expand_as(input_ids))
    ok = torch.stack([~keep.all(), right_padded(attention_mask), (position_ids[:, 0] == 0).all(),
                      keep[:, 0].all()])
    if not bool(ok.all()):
        return None
    ids, pos = input_ids[keep], position_ids[keep]
    tgt = targets[keep] if targets is not None else None
    extra = -ids.numel() % MULTIPLE
    if extra:  # a row of pads of its own, no targets
        ids = torch.cat([ids, ids.new_zeros(extra)])
        pos = torch.cat([pos, torch.arange(extra, device=pos.device, dtype=pos.dtype)])
        if tgt is not None:
            tgt = torch.cat([tgt, tgt.new_full((extra,), IGNORE_INDEX)])
    out = (keep, ids[None], pos[None])
    return out if tgt is None else (*out, tgt[None])


def repad(h: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """(1, N', H) outputs of the real tokens -> (B, T, H) at their places in the padded batch, zeros at the
    pads (differentiable)."""
    B, T = keep.shape
    return h.new_zeros(B, T, h.shape[-1]).masked_scatter(keep[..., None].expand(B, T, h.shape[-1]), h[0])
