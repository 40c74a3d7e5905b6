"""The flex BlockMask of a mask pattern, built with a few tensor operations.

`torch.nn.attention.flex_attention.create_block_mask` evaluates the pattern under four nested `vmap`s: some
forty thousand Python calls, while the GPU waits, at every forward that builds one (a DPO step builds two).
`block_mask` evaluates the same pattern once on broadcast index tensors (batch (B, 1, 1), queries (1, Q, 1),
keys (1, 1, T)), a chunk of query blocks at a time, counts the allowed entries of each 128 × 128 block, and
hands the counts to `BlockMask.from_kv_blocks` as create_block_mask does: a block with every entry allowed
is full (flex skips the pattern there), one with some is partial, one with none is skipped.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

BLOCK = 128  # flex_attention's default sparse block, both sides
CHUNK_ELEMENTS = 1 << 26  # pattern entries evaluated at once (64 Mi booleans)


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, H, nq, nk) 0/1 -> the count per query block and the key blocks, chosen ones first, in order."""
    blocks = blocks.to(torch.int32)
    count = blocks.sum(dim=-1, dtype=torch.int32)
    order = torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)
    return count, order


def block_mask(pattern: Callable, batch: int | None, length: int, device: torch.device):
    """The BlockMask that `create_block_mask(pattern, batch, None, length, length, device=device)` builds.

    `pattern(b, h, q, k)` must broadcast over index tensors (it may index (B, T) tensors with `b` and `q`
    or `k`) and must not read `h`; `batch` None means the pattern does not depend on `b`.
    """
    from torch.nn.attention.flex_attention import BlockMask

    B, n = batch or 1, -(-length // BLOCK)
    b = torch.arange(B, device=device)[:, None, None]
    k = torch.arange(length, device=device)[None, None, :]
    rows = max(1, CHUNK_ELEMENTS // (B * length * BLOCK)) * BLOCK  # query rows a chunk
    counts = []
    for start in range(0, length, rows):
        stop = min(start + rows, length)
        q = torch.arange(start, stop, device=device)[None, :, None]
        allowed = pattern(b, None, q, k).expand(B, stop - start, length)
        # pad to whole blocks with entries not allowed, as create_block_mask does
        tail = -(stop - start) % BLOCK
        allowed = F.pad(allowed, (0, n * BLOCK - length, 0, tail))
        counts.append(allowed.view(B, -1, BLOCK, n, BLOCK).sum(dim=(2, 4)))
    count = torch.cat(counts, dim=1)[:, None]  # (B, 1, n, n) allowed entries per block
    full = count == BLOCK * BLOCK
    partial = (count > 0) & ~full
    return BlockMask.from_kv_blocks(*_ordered(partial), *_ordered(full), BLOCK_SIZE=BLOCK, mask_mod=pattern,
                                    seq_lengths=(length, length))
