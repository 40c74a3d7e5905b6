"""The offloader's pinned copies (on the CPU; its streams and pinned memory run in the CUDA tests of
tests/models/test_llama.py)."""

from __future__ import annotations

import pytest
import torch

from fasttune.memory.host import pinned_pieces
from fasttune.memory.offload import PinnedCopy


@pytest.mark.parametrize("shape", [(3, 1 << 18), (2, 1000, 700), (5,)])
def test_pinned_copy_in_pieces_round_trips(shape):
    """A tensor copied to the host in its pinned pieces comes back whole, bit for bit (here in plain host
    memory; on CUDA the offloader's tests run the pinned copies)."""
    t = torch.randn(shape).to(torch.bfloat16)
    host = PinnedCopy.of(t, pin=False)
    assert [p.numel() * 2 for p in host.pieces] == pinned_pieces(t.numel() * 2)
    back = torch.empty(shape, dtype=torch.bfloat16)
    host.copy_into(back)
    assert torch.equal(back, t)
    strided = torch.randn(64, 4096)[:, ::2]  # not contiguous: one piece of its own shape
    host = PinnedCopy.of(strided, pin=False)
    back = torch.empty(strided.shape)
    host.copy_into(back)
    assert len(host.pieces) == 1 and torch.equal(back, strided)
