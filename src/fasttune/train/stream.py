"""The endless, resumable stream of micro-batches the training loop reads from.

Each epoch visits every sequence once in an order drawn from `seed + epoch`, so the order of any
epoch can be rebuilt from two integers; the stream's state is just `{epoch, index}` and a resumed
run continues with exactly the micro-batch the interrupted one would have taken next.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


class BatchStream:
    """Micro-batches of `batch_size` sequences, collated by `collate`, epoch after epoch.

    `len(stream)` is the number of micro-batches per epoch (the last one may be smaller).
    """

    def __init__(self, sequences: Sequence[Any], batch_size: int, collate: Callable[[list[Any]], Batch],
                 seed: int = 0, shuffle: bool = True):
        if not sequences:
            raise ValueError("no training sequences: the dataset is empty after tokenisation")
        self.sequences = sequences
        self.batch_size = batch_size
        self.collate = collate
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.index = 0  # micro-batches already taken in this epoch
        self._order = self._order_for(0)

    def __len__(self) -> int:
        return -(-len(self.sequences) // self.batch_size)

    def _order_for(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.sequences)))
        g = torch.Generator().manual_seed(self.seed + epoch)
        return torch.randperm(len(self.sequences), generator=g).tolist()

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> Batch:
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._order_for(self.epoch)
        start = self.index * self.batch_size
        picked = [self.sequences[i] for i in self._order[start:start + self.batch_size]]
        self.index += 1
        return self.collate(picked)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._order_for(self.epoch)
