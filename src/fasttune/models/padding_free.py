"""Padded training batches run padding-free: the real tokens of every row in one packed row.

A right-padded batch (B, T) of rows that each start at position 0 becomes one sequence of its N real tokens,
positions restarting at each row, so that the model's packed-row attention (`models.attention`, case (b))
keeps every token inside its own row, as the padded batch's causal mask did:
```
input_ids   a a a . .        position_ids  0 1 2 . .        ->   a a a b b b b     position_ids  0 1 2 0 1 2 3
            b b b b .                      0 1 2 3 .
```
The loss sums the same targets over the same tokens, so it is the padded batch's (up to the order of fp32
sums); the pads' share of the products and of the attention is not computed. N is rounded up to a multiple
of 16 with pad tokens in a row of their own and no targets, so the kernels, which Triton compiles apart for
lengths that 16 divides and those it does not, see one kind of length.
"""

from __future__ import annotations

import torch

from fasttune.models.base import IGNORE_INDEX

MULTIPLE = 16


def unpad_rows(input_ids: torch.Tensor, position_ids: torch.Tensor | None, targets: torch.Tensor,
               attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """(input_ids, position_ids, targets), each (1, N'), of the batch's real tokens, or None where the batch
    has no padding, is not right-padded, or has a row that does not start at position 0 (one host sync)."""
    keep = attention_mask.bool()
    if position_ids is None:
        position_ids = (torch.arange(input_ids.shape[1], device=input_ids.device)
                        .expand_as(input_ids))
    right_padded = (attention_mask[:, 1:] <= attention_mask[:, :-1]).all()
    ok = torch.stack([~keep.all(), right_padded, (position_ids[:, 0] == 0).all(), keep[:, 0].all()])
    if not bool(ok.all()):
        return None
    ids, pos, tgt = input_ids[keep], position_ids[keep], targets[keep]
    extra = -ids.numel() % MULTIPLE
    if extra:  # a row of pads of its own, no targets
        pad = torch.arange(extra, device=ids.device)
        ids = torch.cat([ids, ids.new_zeros(extra)])
        pos = torch.cat([pos, pad.to(pos.dtype)])
        tgt = torch.cat([tgt, tgt.new_full((extra,), IGNORE_INDEX)])
    return ids[None], pos[None], tgt[None]
