"""Preference pairs and KTO rows -> micro-batches: every scored sequence of a micro-batch in one forward.

The batch keeps the contract of docs/ARCHITECTURE.md (input_ids, targets, position_ids, attention_mask)
and adds `sequence` (B, T): the index of the scored sequence a target position belongs to, -1 elsewhere,
and `units`, the number of pairs (DPO, ORPO) or rows (KTO) the batch holds.

Pairs, concatenated (the default; TRL's layout): rows are chosen_0 .. chosen_{n-1}, rejected_0 ..
rejected_{n-1}, right-padded; sequence i is row i. Packed (`packing`, where the model keeps attention
inside each packed row and takes `branch`): row i holds chosen_i whole, then rejected_i without the tokens
it shares with chosen_i, computed once. The shared part is their common prefix, up to the position that
predicts the first scored token of rejected_i (the prompt less its last token, when both carry the same
prompt ids); `branch` (B, T) marks it 0, chosen's own tokens 1 and rejected's 2, and a token attends to the
tokens before it in its row of its own branch or of branch 0. Rejected's positions go on from the shared
part, as if it followed it alone. With two pairs (prompt p p p, chosen c c, rejected r r r):
    packed row 0   p p | p c c | p r r r     position  0 1 | 2 3 4 | 2 3 4 5     branch  0 0 | 1 1 1 | 2 2 2 2
                                             sequence -1 -1 | 0 0 -1 | 2 2 2 -1  (targets shifted by one)
Pairs with no common prefix keep both sequences whole: rejected's positions restart at 0, a row of its own.
Equal in every log-probability to the unshared layout; fewer tokens by the shared ones.
`whole_chosen` (ORPO) also scores every token of each chosen sequence, prompt included, for its NLL term;
`whole` (B, T) marks those positions.

KTO rows: rows 0..n-1 are prompt_i + completion_i, rows n..2n-1 the mismatched prompt_i +
completion_{i-1} (TRL's KL estimate, rotated inside the micro-batch); `label` (n,) is 1 for desirable rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fasttune.data.packing import padded_length, shift_targets
from fasttune.data.pairs import PairExample, UnpairedExample
from fasttune.data.position import EpochPosition, seeded_batches
from fasttune.data.tokenize import Example
from fasttune.models.base import IGNORE_INDEX


@dataclass(frozen=True)
class Segment:
    """Consecutive tokens of one batch row: ids, shifted targets, which targets are scored (for sequence
    `index`), whether `whole` scores every target, the position of its first token and its branch."""

    ids: list[int]
    targets: list[int]
    scored: list[bool]
    index: int
    whole: bool = False
    start: int = 0
    branch: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def head(self, k: int) -> Segment:
        """Its first k tokens, in the shared branch 0."""
        return Segment(self.ids[:k], self.targets[:k], self.scored[:k], self.index, self.whole, self.start, 0)

    def tail(self, k: int, branch: int) -> Segment:
        """Its tokens from the k-th on, in `branch`; positions continue from k."""
        return Segment(self.ids[k:], self.targets[k:], self.scored[k:], self.index, self.whole,
                       self.start + k, branch)


def _segment(example: Example, index: int, whole: bool = False) -> Segment:
    """The example's ids and shifted targets (every next token when `whole`), scored on the completion."""
    targets = shift_targets(example.labels)
    scored = [t != IGNORE_INDEX for t in targets]
    if whole:
        targets = list(example.input_ids[1:]) + [IGNORE_INDEX]
    return Segment(list(example.input_ids), targets, scored, index, whole)


def shared_tokens(chosen: Segment, rejected: Segment) -> int:
    """How many leading tokens rejected can take from chosen: their common prefix, up to rejected's first
    scored position (a shared position has chosen's target only)."""
    limit = next((i for i, s in enumerate(rejected.scored) if s), len(rejected))
    n = 0
    for a, b in zip(chosen.ids[:limit], rejected.ids[:limit]):
        if a != b:
            break
        n += 1
    return n


def _collate_rows(rows: list[list[Segment]], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """rows: per batch row, its segments. `branch` is in the batch only where some row shares tokens."""
    width = padded_length(max(sum(len(s) for s in r) for r in rows), max_len * max(len(r) for r in rows))
    B = len(rows)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    tgt = torch.full((B, width), IGNORE_INDEX, dtype=torch.long)
    pos = torch.empty((B, width), dtype=torch.long)
    att = torch.zeros((B, width), dtype=torch.long)
    seq = torch.full((B, width), -1, dtype=torch.long)
    whole = torch.zeros((B, width), dtype=torch.bool)
    branch = torch.zeros((B, width), dtype=torch.long)
    for b, segments in enumerate(rows):
        at = 0
        for s in segments:
            n = len(s)
            ids[b, at:at + n] = torch.tensor(s.ids)
            tgt[b, at:at + n] = torch.tensor(s.targets)
            pos[b, at:at + n] = torch.arange(s.start, s.start + n)
            att[b, at:at + n] = 1
            seq[b, at:at + n] = torch.where(torch.tensor(s.scored), s.index, -1)
            branch[b, at:at + n] = s.branch
            if s.whole:
                whole[b, at:at + n] = torch.tensor(s.targets) != IGNORE_INDEX
            at += n
        last = int(pos[b, at - 1]) + 1
        pos[b, at:] = torch.arange(last, last + width - at)  # pads continue the last row's positions
        branch[b, at:] = 3  # a branch of their own: they see the shared tokens and each other
    out = {"input_ids": ids, "targets": tgt, "position_ids": pos, "attention_mask": att, "sequence": seq,
           "whole": whole}
    if any(s.branch for segments in rows for s in segments):  # some row shares tokens between sequences
        out["branch"] = branch
    return out


def collate_pairs(pairs: Sequence[PairExample], pad_id: int, max_len: int, packed: bool,
                  whole_chosen: bool = False) -> dict[str, torch.Tensor]:
    n = len(pairs)
    chosen = [_segment(p.chosen, i, whole_chosen) for i, p in enumerate(pairs)]
    rejected = [_segment(p.rejected, n + i) for i, p in enumerate(pairs)]
    if packed:
        rows = []
        for c, r in zip(chosen, rejected):
            k = shared_tokens(c, r)
            if k:  # chosen = shared part + its own tokens; rejected's own tokens follow
                rows.append([c.head(k), c.tail(k, 1), r.tail(k, 2)])
            else:
                rows.append([c, r])
    else:
        rows = [[x] for x in chosen + rejected]
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
        segments.append([_segment(r.example, i)])
    for i in range(n):  # prompt_i + completion_{i-1}: completions rotated by one inside the micro-batch
        prompt, completion = parts[i][0], parts[i - 1][1]
        kl = Example(prompt + completion, [IGNORE_INDEX] * len(prompt) + completion)
        kl = Example(kl.input_ids[:max_len], kl.labels[:max_len])
        segments.append([_segment(kl, n + i)])
    batch = _collate_rows(segments, pad_id, max_len)
    batch["units"] = torch.tensor(n)
    batch["label"] = torch.tensor([r.label for r in rows], dtype=torch.bool)
    return batch


class ExampleStream:
    """Endless micro-batches of `batch_size` examples (pairs or KTO rows) in a seeded per-epoch order,
    with the resumable position {"epoch", "index"} of the training loop's `ResumableStream`.

    `epoch_windows`: each epoch ends on its own accumulation window, as transformers' Trainer ends it: the
    loop asks `window_size` how many micro-batches its next step takes, fewer than the accumulation where
    the epoch has fewer left. Without it a window may reach into the next epoch.
    """

    def __init__(self, examples: Sequence[Any], batch_size: int, collate: Any, seed: int,
                 shuffle: bool = True, epoch_windows: bool = False) -> None:
        if not examples:
            raise ValueError("no examples to batch")
        self.examples, self.batch_size, self.collate, self.seed = list(examples), batch_size, collate, seed
        self.shuffle = shuffle  # False: every epoch in dataset order
        self.epoch_windows = epoch_windows
        self.position = EpochPosition(self.plan)

    def window_size(self, accumulation: int) -> int:
        """Micro-batches of the next optimiser step: `accumulation`, with `epoch_windows` at most those left
        in the epoch."""
        return min(accumulation, self.position.left()) if self.epoch_windows else accumulation

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
