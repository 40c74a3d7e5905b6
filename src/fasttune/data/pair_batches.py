"""Preference pairs and KTO rows -> micro-batches: every scored sequence of a micro-batch in one forward.

The batch keeps the contract of docs/ARCHITECTURE.md (input_ids, targets, position_ids, attention_mask)
and adds `sequence` (B, T): the index of the scored sequence a target position belongs to, -1 elsewhere,
and `units`, the number of pairs (DPO, ORPO) or rows (KTO) the batch holds.

Pairs, concatenated (the default; TRL's layout): rows are chosen_0 .. chosen_{n-1}, rejected_0 ..
rejected_{n-1}, right-padded; sequence i is row i. Packed (`packing`, where the model keeps attention
inside each packed row): row i holds chosen_i then rejected_i, positions restarting at the second;
sequence i is chosen_i, n + i is rejected_i. With two pairs (prompt p, chosen c, rejected r):
    packed row 0   p p c c | p p r r r      sequence  -1 0 0 -1 | -1 2 2 2 -1   (targets shifted by one)
`whole_chosen` (ORPO) also scores every token of each chosen sequence, prompt included, for its NLL term;
`whole` (B, T) marks those positions.

KTO rows: rows 0..n-1 are prompt_i + completion_i, rows n..2n-1 the mismatched prompt_i +
completion_{i-1} (TRL's KL estimate, rotated inside the micro-batch); `label` (n,) is 1 for desirable rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fasttune.data.packing import padded_length, shift_targets
from fasttune.data.pairs import PairExample, UnpairedExample
from fasttune.data.position import EpochPosition, seeded_batches
from fasttune.data.tokenize import Example
from fasttune.models.base import IGNORE_INDEX


def _pieces(example: Example, whole: bool = False) -> tuple[list[int], list[int], list[bool]]:
    """input ids, shifted targets (every next token when `whole`) and which targets are the completion's."""
    targets = shift_targets(example.labels)
    scored = [t != IGNORE_INDEX for t in targets]
    if whole:
        targets = list(example.input_ids[1:]) + [IGNORE_INDEX]
    return list(example.input_ids), targets, scored


def _collate_rows(rows: list[list[tuple[list[int], list[int], list[bool], int, bool]]], pad_id: int,
                  max_len: int) -> dict[str, torch.Tensor]:
    """rows: per batch row, its segments (ids, targets, completion flags, sequence index, whole)."""
    width = padded_length(max(sum(len(s[0]) for s in r) for r in rows), max_len * max(len(r) for r in rows))
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    tgt = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.empty((B, width), dtype=torch.long)
    att = torch.zeros((B, width), dtype=torch.long)
    seq = torch.full((B, width), -1, dtype=torch.long)
    whole = torch.zeros((B, width), dtype=torch.bool)
    for b, segments in enumerate(rows):
        at = 0
        for s_ids, s_tgt, s_scored, index, s_whole in segments:
            n = len(s_ids)
            ids[b, at:at + n] = torch.tensor(s_ids)
            tgt[b, at:at + n] = torch.tensor(s_tgt)
            pos[b, at:at + n] = torch.arange(n)
            att[b, at:at + n] = 1
            seq[b, at:at + n] = torch.where(torch.tensor(s_scored), index, -1)
            if s_whole:
                whole[b, at:at + n] = torch.tensor(s_tgt) != IGNORE_INDEX
            at += n
        last = int(pos[b, at - 1]) + 1
        pos[b, at:] = torch.arange(last, last + width - at)  # pads continue the last row's positions
    return {"input_ids": ids, "targets": tgt, "position_ids": pos, "attention_mask": att, "sequence": seq,
            "whole": whole}


def collate_pairs(pairs: Sequence[PairExample], pad_id: int, max_len: int, packed: bool,
                  whole_chosen: bool = False) -> dict[str, torch.Tensor]:
    n = len(pairs)
    chosen = [(*_pieces(p.chosen, whole_chosen), i, whole_chosen) for i, p in enumerate(pairs)]
    rejected = [(*_pieces(p.rejected), n + i, False) for i, p in enumerate(pairs)]
    rows = [[c, r] for c, r in zip(chosen, rejected)] if packed else [[x] for x in chosen + rejected]
    batch = _collate_rows(rows, pad_id, max_len)
    batch["units"] = torch.tensor(n)
    return batch


def _split(example: Example) -> tuple[list[int], list[int]]:
    """(prompt ids, completion ids): the completion starts at the first trained token."""
    start = next(i for i, lab in enumerate(example.labels) if lab != IGNORE_INDEX)
    return list(example.input_ids[:start]), list(example.input_ids[start:])


def collate_unpaired(rows: Sequence[UnpairedExample], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    n = len(rows)
    parts = [_split(r.example) for r in rows]
    segments = []
    for i, r in enumerate(rows):
        segments.append([(*_pieces(r.example), i, False)])
    for i in range(n):  # prompt_i + completion_{i-1}: completions rotated by one inside the micro-batch
        prompt, completion = parts[i][0], parts[i - 1][1]
        kl = Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
        kl = Example(kl.input_ids[:max_len], kl.labels[:max_len])
        segments.append([(*_pieces(kl), n + i, False)])
    batch = _collate_rows(segments, pad_id, max_len)
    batch["units"] = torch.tensor(n)
    batch["label"] = torch.tensor([r.label for r in rows], dtype=torch.bool)
    return batch


class ExampleStream:
    """Endless micro-batches of `batch_size` examples (pairs or KTO rows) in a seeded per-epoch order,
    with the resumable position {"epoch", "index"} of the training loop's `ResumableStream`."""

    def __init__(self, examples: Sequence[Any], batch_size: int, collate: Any, seed: int,
                 shuffle: bool = True) -> None:
        if not examples:
            raise ValueError("no examples to batch")
        self.examples, self.batch_size, self.collate, self.seed = list(examples), batch_size, collate, seed
        self.shuffle = shuffle  # False: every epoch in dataset order
        self.position = EpochPosition(self.plan)

    def plan(self, epoch: int) -> list[list[int]]:
        return seeded_batches(len(self.examples), self.batch_size, self.seed, epoch, self.shuffle)

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def __iter__(self) -> ExampleStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        return self.collate([self.examples[i] for i in self.position.take()])

    def state_dict(self) -> dict[str, int]:
        return self.position.state_dict()

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position.load_state_dict(state)


def fixed_batches(examples: Sequence[Any], batch_size: int, collate: Any) -> list[dict[str, torch.Tensor]]:
    """Every micro-batch of the examples in their order (the eval split)."""
    return [collate(list(examples[k:k + batch_size])) for k in range(0, len(examples), batch_size)]
