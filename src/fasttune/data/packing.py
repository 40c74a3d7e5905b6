"""Examples → micro-batches (the batch contract in docs/ARCHITECTURE.md), packed or padded, with a
seeded per-epoch order and a resumable position.

Worked example, rows `a b EOS` and `c d EOS` (prompts a, c masked) packed into one sequence, T=8:
    input_ids     a     b     EOS   c     d     EOS   pad   pad
    position_ids  0     1     2     0     1     2     3     4
    targets       b     EOS   -100  d     EOS   -100  -100  -100
    attention     1     1     1     1     1     1     0     0
Targets are shifted inside each row before packing, so no row predicts the next row's first token.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fasttune.data.position import EpochPosition
from fasttune.models.base import IGNORE_INDEX

PAD_MULTIPLE = 8

# A plan: micro-batches → sequences → indices of the examples packed into that sequence, in order.
Plan = list[list[list[int]]]


def shift_targets(labels: Sequence[int]) -> list[int]:
    """targets[t] = labels[t + 1]; the last position predicts nothing."""
    return list(labels[1:]) + [IGNORE_INDEX]


def resolve_packing(setting: str, exact: bool) -> bool:
    """DataConfig.packing ('auto'/'on'/'off') → bool; 'auto' packs only where the model keeps
    attention inside each packed row (`exact`)."""
    return setting == "on" or (setting == "auto" and exact)


def padded_length(longest: int, max_seq_length: int) -> int:
    """The batch width: the longest sequence rounded up to a multiple of 8, never past max_seq_length."""
    rounded = -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE
    return max(longest, min(rounded, max_seq_length))


def pack_bins(lengths: Sequence[int], capacity: int, order: Sequence[int]) -> list[list[int]]:
    """Best-fit decreasing: visit rows longest first (ties in `order`), put each in the fullest
    sequence it still fits, else open a new one. O(n log n); no row is ever split."""
    by_length = sorted(order, key=lambda i: -lengths[i])  # stable: ties keep the shuffled order
    bins: list[list[int]] = []
    free: list[tuple[int, int]] = []  # sorted (room left, bin index)
    for i in by_length:
        n = lengths[i]
        j = bisect.bisect_left(free, (n, -1))
        if j < len(free):
            room, b = free.pop(j)
        else:
            room, b = capacity, len(bins)
            bins.append([])
        bins[b].append(i)
        if room - n > 0:
            bisect.insort(free, (room - n, b))
    return bins


SAMPLERS = ("seeded", "torch", "sequential")


def _length_grouped(sequences: list[list[int]], lengths: Sequence[int], batch_size: int,
                    generator: torch.Generator) -> list[list[int]]:
    """`sequences` reordered as transformers' group_by_length orders rows: a random permutation cut into
    mega-batches of 50 micro-batches (fewer for small data), each sorted longest first, the longest
    sequence of all in the first micro-batch. Neighbours then have similar lengths, so a padded batch
    holds little padding, and the order stays random between mega-batches."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

    totals = [sum(lengths[i] for i in seq) for seq in sequences]
    return [sequences[k] for k in get_length_grouped_indices(totals, batch_size, generator=generator)]


def plan_epoch(lengths: Sequence[int], batch_size: int, max_seq_length: int, packing: bool, seed: int,
               epoch: int, group_by_length: bool = False, sampler: str = "seeded") -> Plan:
    """The micro-batches of one epoch, `batch_size` sequences each.

    sampler 'seeded': a permutation seeded by (seed, epoch), then rows packed into sequences (packing)
    or one row per sequence, the sequences permuted again. sampler 'torch': the order in which
    transformers' Trainer draws rows (`torch.randperm` with a generator seeded by seed + epoch, as
    accelerate's seedable sampler does); packed sequences are built once in dataset order, as TRL packs
    a dataset before sampling, and permuted the same way. sampler 'sequential': dataset order, as
    transformers' Trainer evaluates (packed sequences built in dataset order). group_by_length: the
    sequences are then ordered as transformers' group_by_length orders rows (`_length_grouped`), seeded by
    seed + epoch.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r}: expected one of {', '.join(SAMPLERS)}")
    too_long = [i for i, n in enumerate(lengths) if n > max_seq_length]
    if too_long:
        raise ValueError(f"{len(too_long)} examples are longer than max_seq_length={max_seq_length} "
                         "(build_dataset truncates or drops them)")
    if sampler == "seeded":
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(lengths)).tolist()
        if packing:
            sequences = pack_bins(lengths, max_seq_length, order)
            sequences = [sequences[k] for k in rng.permutation(len(sequences)).tolist()]
        else:
            sequences = [[i] for i in order]
    else:
        rows = range(len(lengths))
        sequences = pack_bins(lengths, max_seq_length, rows) if packing else [[i] for i in rows]
        if sampler == "torch":
            perm = torch.randperm(len(sequences), generator=torch.Generator().manual_seed(seed + epoch))
            sequences = [sequences[k] for k in perm.tolist()]
    if group_by_length:
        generator = torch.Generator().manual_seed(seed + epoch)
        sequences = _length_grouped(sequences, lengths, batch_size, generator)
    return [sequences[k:k + batch_size] for k in range(0, len(sequences), batch_size)]


def collate(batch: list[list[int]], input_ids: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
            pad_id: int, max_seq_length: int) -> dict[str, torch.Tensor]:
    """One micro-batch as tensors; `input_ids`/`targets` are per example (targets already shifted)."""
    rows_ids, rows_tgt, rows_pos = [], [], []
    for seq in batch:
        ids, tgt, pos = [], [], []
        for i in seq:
            ids.extend(input_ids[i])
            tgt.extend(targets[i])
            pos.extend(range(len(input_ids[i])))
        rows_ids.append(ids)
        rows_tgt.append(tgt)
        rows_pos.append(pos)
    T = padded_length(max(len(r) for r in rows_ids), max_seq_length)
    B = len(batch)
    out_ids = torch.full((B, T), pad_id, dtype=torch.long)
    out_tgt = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    out_pos = torch.empty((B, T), dtype=torch.long)
    out_mask = torch.zeros((B, T), dtype=torch.long)
    for b, (ids, tgt, pos) in enumerate(zip(rows_ids, rows_tgt, rows_pos)):
        n = len(ids)
        out_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
        out_tgt[b, :n] = torch.tensor(tgt, dtype=torch.long)
        out_pos[b, :n] = torch.tensor(pos, dtype=torch.long)
        # Pads continue the last row's positions, so position 0 still marks only real row starts.
        last = pos[-1] + 1 if n else 0
        out_pos[b, n:] = torch.arange(last, last + T - n)
        out_mask[b, :n] = 1
    return {"input_ids": out_ids, "targets": out_tgt, "position_ids": out_pos, "attention_mask": out_mask}


def filler_batch(pad_id: int) -> dict[str, torch.Tensor]:
    """A micro-batch that trains nothing: one row of PAD_MULTIPLE pad ids, the first attended, no
    target. Its loss and gradient are zero; it completes an accumulation window, or stands for a rank's
    empty share of an epoch's short last global micro-batch (BatchStream)."""
    ids = torch.full((1, PAD_MULTIPLE), pad_id, dtype=torch.long)
    mask = torch.zeros((1, PAD_MULTIPLE), dtype=torch.long)
    mask[0, 0] = 1
    return {"input_ids": ids, "targets": torch.full_like(ids, IGNORE_INDEX),
            "position_ids": torch.arange(PAD_MULTIPLE).unsqueeze(0), "attention_mask": mask}


def make_batches(examples: Sequence[Any], batch_size: int, max_seq_length: int, pad_id: int, packing: bool,
                 seed: int, epoch: int, group_by_length: bool = False,
                 sampler: str = "seeded") -> list[dict[str, torch.Tensor]]:
    """Every micro-batch of one epoch (examples carry `input_ids` and unshifted `labels`)."""
    ids = [e.input_ids for e in examples]
    targets = [shift_targets(e.labels) for e in examples]
    plan = plan_epoch([len(x) for x in ids], batch_size, max_seq_length, packing, seed, epoch,
                      group_by_length=group_by_length, sampler=sampler)
    return [collate(b, ids, targets, pad_id, max_seq_length) for b in plan]


class BatchStream:
    """Endless micro-batches across epochs with an exact, resumable position.

    The epoch's plan is one global sequence of micro-batches of `batch_size * world_size` sequences,
    whatever the world size; rank r takes sequences [r * batch_size, (r + 1) * batch_size) of each. So
    2 ranks x batch 1 and 1 rank x batch 2 train on the same rows at every step:
    ```
    global micro-batch k   s0 s1 | s2 s3 | ...        (sequences of the epoch's plan, 2 per micro-batch)
    world 1, batch 2       rank 0: s0 s1
    world 2, batch 1       rank 0: s0    rank 1: s1
    ```
    The last global micro-batch of an epoch may be short: a rank whose slice of it is empty gets a
    `filler_batch` (nothing trained) and stays in step with the others' collectives. `state_dict()` is
    {"epoch", "index"}: the next batch is global micro-batch `index` of epoch `epoch` (plans are rebuilt
    from the seed, so nothing else need be saved), the same position on every rank. `len()` is global
    micro-batches per epoch. `epoch_multiple` N > 1 ends each epoch on a window of N micro-batches, as
    transformers' Trainer does: the last window of an epoch holds its remaining micro-batches and is
    completed with filler batches.
    """

    def __init__(self, examples: Sequence[Any], batch_size: int, max_seq_length: int, pad_id: int,
                 packing: bool, seed: int, rank: int = 0, world_size: int = 1, group_by_length: bool = False,
                 sampler: str = "seeded", epoch_multiple: int = 1) -> None:
        if not examples:
            raise ValueError("no examples to batch")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.input_ids = [list(e.input_ids) for e in examples]
        self.targets = [shift_targets(e.labels) for e in examples]
        self.lengths = [len(x) for x in self.input_ids]
        self.batch_size, self.max_seq_length, self.pad_id = batch_size, max_seq_length, pad_id
        self.packing, self.seed, self.rank, self.world_size = packing, seed, rank, world_size
        self.group_by_length, self.sampler, self.epoch_multiple = group_by_length, sampler, epoch_multiple
        self._plan: tuple[int, Plan] | None = None
        self.position = EpochPosition(self.plan)

    @property
    def global_batch(self) -> int:
        """Sequences per global micro-batch: batch_size on each of world_size ranks."""
        return self.batch_size * self.world_size

    def plan(self, epoch: int) -> Plan:
        """The global micro-batches of `epoch` (cached for the last epoch asked for)."""
        if self._plan is None or self._plan[0] != epoch:
            full = plan_epoch(self.lengths, self.global_batch, self.max_seq_length, self.packing, self.seed,
                              epoch, group_by_length=self.group_by_length, sampler=self.sampler)
            if len(full) % self.epoch_multiple:  # [] stands for a filler micro-batch
                full = full + [[]] * (self.epoch_multiple - len(full) % self.epoch_multiple)
            self._plan = (epoch, full)
        return self._plan[1]

    def __len__(self) -> int:
        # The number of sequences does not depend on the epoch: packing sees the same lengths each time.
        return len(self.position)

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        mine = self.position.take()[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        return (collate(mine, self.input_ids, self.targets, self.pad_id, self.max_seq_length) if mine
                else filler_batch(self.pad_id))

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position.load_state_dict(state)
