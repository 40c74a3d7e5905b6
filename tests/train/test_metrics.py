"""metrics.jsonl reading/writing, the plot, the summary."""

from __future__ import annotations

import mmap

import torch

from fasttune.train.metrics import (
    MetricsWriter,
    memory_used,
    plot_loss,
    read_metrics,
    summary_text,
    truncate_after,
)


def test_write_read_truncate(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path)
    for step in range(1, 6):
        w.write({"kind": "train", "step": step, "loss": 3.0 - step * 0.1})
    w.write({"kind": "eval", "step": 5, "eval_loss": 2.0})
    with open(path, "a") as f:
        f.write('{"kind": "train", "st')  # a line torn by a crash
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5, 5]
    truncate_after(path, 3)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3]


def test_plot(tmp_path):
    path = tmp_path / "metrics.jsonl"
    w = MetricsWriter(path)
    w.write({"kind": "eval", "step": 0, "eval_loss": 3.0})
    for step in range(1, 11):
        w.write({"kind": "train", "step": step, "loss": 3.0 / step})
    w.write({"kind": "eval", "step": 10, "eval_loss": 1.0})
    out = plot_loss(path, tmp_path / "loss.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 5000
    assert plot_loss(tmp_path / "missing.jsonl", tmp_path / "x.png") is None


def test_summary_and_memory():
    gib, kind = memory_used(torch.device("cpu"))
    # 256 MiB of fresh anonymous pages, every page written: resident whatever the allocator kept before
    # (a tensor may reuse heap memory that is already resident in a long test process)
    held = mmap.mmap(-1, 2**28)
    for offset in range(0, 2**28, mmap.PAGESIZE):
        held[offset] = 1
    more, _ = memory_used(torch.device("cpu"))
    held.close()
    assert kind == "rss" and 0.01 < gib < 1000 and 0.2 < more - gib < 0.3
    text = summary_text({"steps": 10, "seconds": 75.0, "train_seconds": 70.0, "tokens": 12345,
                         "trained_tokens": 6000,
                         "tokens_per_s": 164.6, "first_loss": 3.2, "final_loss": 1.1, "eval_loss": 1.3,
                         "first_eval_loss": 3.0, "memory_gib": 0.7, "memory_kind": "rss"})
    assert "1m15s" in text and "12,345" in text and "3.2000 -> 1.1000" in text and "3.0000 -> 1.3000" in text
