"""kernels.scratch: reuse, growth, release, and the size kept across a release."""

from __future__ import annotations

import torch

from fasttune.kernels.scratch import Scratch, release_scratch


def test_reused_grown_released_and_made_again_at_its_size():
    s = Scratch()
    a = s.get("k", 10, torch.float32, torch.device("cpu"))
    b = s.get("k", 6, torch.float32, torch.device("cpu"))
    assert b.data_ptr() == a.data_ptr() and s.held() == 40  # one tensor, reused
    c = s.get("k", 12, torch.float32, torch.device("cpu"))
    assert c.numel() == 12 and s.held() == 48  # grown to the largest request
    release_scratch()
    assert s.held() == 0
    c.fill_(1.0)  # a view taken before the release stays valid: it holds its own storage
    d = s.get("k", 3, torch.float32, torch.device("cpu"))
    assert d.numel() == 3 and s.held() == 48  # made again at the size it had reached


def test_kept_for_good_once_a_cuda_graph_may_read_them(monkeypatch):
    from fasttune.kernels import scratch

    monkeypatch.setattr(scratch, "_kept", False)
    s = Scratch()
    s.get("k", 4, torch.float32, torch.device("cpu"))
    scratch.keep_scratch()
    release_scratch()
    assert s.held() == 16
