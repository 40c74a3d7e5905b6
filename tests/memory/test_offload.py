"""The offloader's pinned copies and slabs (on the CPU, in plain host memory; its streams and pinned memory
run in the CUDA tests of tests/models/test_llama.py)."""

from __future__ import annotations

import pytest
import torch

import fasttune.memory.offload as offload
from fasttune.memory.offload import PinnedCopy, PinnedSlabs, SlabCursor


@pytest.fixture
def small_slabs(monkeypatch):
    monkeypatch.setattr(offload, "SLAB_BYTES", 4096)
    return PinnedSlabs(pin=False)


@pytest.mark.parametrize("shape", [(3, 700), (2, 10, 70), (5,)])
def test_pinned_copy_round_trips_across_slabs(small_slabs, shape):
    """A tensor copied to the host comes back whole, bit for bit, also where it spans several slabs."""
    cursor = SlabCursor(small_slabs)
    t = torch.randn(shape).to(torch.bfloat16)
    host = PinnedCopy.of(t, cursor)
    assert sum(p.numel() for p in host.pieces) == t.numel()
    back = torch.empty(shape, dtype=torch.bfloat16)
    host.copy_into(back)
    assert torch.equal(back, t)
    strided = torch.randn(64, 40)[:, ::2]  # not contiguous
    host = PinnedCopy.of(strided, cursor)
    back = torch.empty(strided.shape)
    host.copy_into(back)
    assert torch.equal(back, strided)


def test_copies_do_not_overlap_and_slabs_are_reused(small_slabs):
    cursor = SlabCursor(small_slabs)
    tensors = [torch.full((n,), float(i)) for i, n in enumerate([300, 1000, 17, 900, 2000])]  # fp32
    copies = [PinnedCopy.of(t, cursor) for t in tensors]
    for t, c in zip(tensors, copies):  # every copy still holds its own values: no range was handed out twice
        back = torch.empty_like(t)
        c.copy_into(back)
        assert torch.equal(back, t)
    made = small_slabs.made
    assert made == len(cursor.held) >= -(-sum(t.numel() * 4 for t in tensors) // 4096)
    cursor.release()
    again = SlabCursor(small_slabs)  # the next step, of another size: the same slabs
    PinnedCopy.of(torch.randn(made * 1024 - 200), again)
    assert small_slabs.made == made
