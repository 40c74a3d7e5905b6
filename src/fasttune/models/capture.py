"""What a training step being captured as a CUDA graph (`train.step_graph`) tells the model about its batch.

While a graph is captured the host cannot read the batch's values (a read waits for the device, which a
capture refuses), and what it reads there decides the kernels: whether the rows are packed
(`models.attention.is_packed`) and where each packed row begins (`memory.kept_attention.PackedRows`). The
caller, which read them from the batch's host copy, says so here: whether the rows are packed, and the most
rows the graph's batches hold, the size of a row table that can be filled on the device (the rows past the
batch's own are empty).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchLayout:
    packed: bool
    max_rows: int = 0  # packed: the row table's size, at least the rows of every batch the graph replays


_LAYOUT: list[BatchLayout] = []


@contextmanager
def batch_layout(layout: BatchLayout) -> Iterator[None]:
    """The layout of the batch whose step runs inside (read only while a capture is under way)."""
    _LAYOUT.append(layout)
    try:
        yield
    finally:
        _LAYOUT.pop()


def captured_layout(t: torch.Tensor) -> BatchLayout | None:
    """The layout given for the step being captured, or None when nothing is captured on t's device now
    (the host may read the batch)."""
    if not t.is_cuda or not torch.cuda.is_current_stream_capturing():
        return None
    if not _LAYOUT:
        raise RuntimeError("a CUDA graph capture of a training step needs its batch layout "
                           "(models.capture.batch_layout): the host cannot read the batch while capturing")
    return _LAYOUT[-1]
