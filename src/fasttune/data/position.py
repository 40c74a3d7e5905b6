"""Where an endless stream of micro-batches stands: which micro-batch of which epoch comes next, where an
epoch ends, and the {"epoch", "index"} state that a checkpoint saves to resume exactly there.

A stream's epochs are plans rebuilt from its seed, so the position is all that resuming needs:
    plan(0) = [m0 m1 m2]   plan(1) = [m0' m1' m2']
    take() -> m0, m1, m2, m0', ...        state after m1: {"epoch": 0, "index": 2}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

import numpy as np

Entry = TypeVar("Entry")


def seeded_batches(count: int, batch_size: int, seed: int, epoch: int,
                   shuffle: bool = True) -> list[list[int]]:
    """Indices 0..count-1 permuted by a generator seeded by (seed, epoch) (`shuffle` False: in order), cut
    into micro-batches of `batch_size` (the last one may be short)."""
    order = np.random.default_rng([seed, epoch]).permutation(count).tolist() if shuffle else [*range(count)]
    return [order[k:k + batch_size] for k in range(0, len(order), batch_size)]


class EpochPosition(Generic[Entry]):
    """Micro-batch `index` of epoch `epoch` comes next; `plan(epoch)` lists an epoch's micro-batches (the
    stream's own description of each: indices of examples, prompts, packed sequences)."""

    def __init__(self, plan: Callable[[int], Sequence[Entry]]) -> None:
        self.plan = plan
        self.epoch, self.index = 0, 0

    def __len__(self) -> int:
        """Micro-batches in the current epoch."""
        return len(self.plan(self.epoch))

    def left(self) -> int:
        """Micro-batches of the current epoch not yet taken."""
        return len(self) - self.index

    def take(self) -> Entry:
        """The next micro-batch's plan entry; the position moves past it, to the next epoch after the last."""
        plan = self.plan(self.epoch)
        entry = plan[self.index]
        self.index += 1
        if self.index >= len(plan):
            self.epoch, self.index = self.epoch + 1, 0
        return entry

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at `state`; a position past the end of its epoch means the data or the batch size is not
        the checkpoint's."""
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        if not 0 <= self.index < len(self):
            raise ValueError(f"data position {state} is outside an epoch of {len(self)} micro-batches; "
                             "was the dataset or batch size changed since the checkpoint?")
