"""What a run records and shows: metrics.jsonl, the loss plot, the end-of-run summary, memory use.

metrics.jsonl holds one JSON object per line, appended and flushed as the run goes:
```
{"kind": "train", "step": 10, "loss": 2.31, "lr": 0.0002, "grad_norm": 0.8, "tokens_per_s": 950.0, ...}
{"kind": "eval", "step": 10, "eval_loss": 2.45, "perplexity": 11.6, "eval_tokens": 4096,
 "n_answered": 8, "exact_match": 0.25, "normalized_match": 0.5, "answer_seconds": 3.1}
```
(the answer fields only where the held-out rows ask questions and answering is on).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import psutil
import torch


class MetricsWriter:
    """Appends one JSON line per record and flushes, so a crash loses at most the line being written."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every complete line of a metrics file (a torn last line after a crash is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def truncate_after(path: str | Path, step: int) -> None:
    """Drop records past `step`: a resumed run re-logs the steps after its checkpoint."""
    path = Path(path)
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    os.replace(tmp, path)


def memory_used(device: torch.device) -> tuple[float, str]:
    """(GiB, what it measures): peak CUDA allocation on a GPU, current process RSS on the CPU (psutil: the
    same figure on Linux, macOS and Windows)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "cuda_max_allocated"
    return psutil.Process().memory_info().rss / 2**30, "rss"


def plot_loss(metrics_path: str | Path, out_png: str | Path) -> Path | None:
    """Training (and eval, when present) loss against optimiser step; None if nothing was logged."""
    records = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    evals = [(r["step"], r["eval_loss"]) for r in records if r.get("kind") == "eval"]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", color="tab:blue", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", color="tab:orange", marker="o", linewidth=1.5)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss per trained token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def perplexity(loss: float) -> float:
    """exp(loss), inf where that overflows a float (a diverged run must not crash its own log line)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return math.inf


def _share(result: dict[str, Any], key: str) -> str:
    """'1/8 (12%) -> 21/30 (70%)': the first eval's count against the last's (which may answer more rows)."""
    def one(rate: float | None, n: int | None) -> str:
        return "-" if rate is None or not n else f"{round(rate * n)}/{n} ({100 * rate:.0f}%)"

    first = one(result.get(f"first_{key}"), result.get("first_n_answered"))
    return f"{first} -> {one(result.get(key), result.get('n_answered'))}"


def summary_text(result: dict[str, Any]) -> str:
    """The lines printed when a run ends, from train_loop's result dict."""
    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    unit = result.get("unit", "tokens")  # what the loss averages over: tokens (SFT), pairs, rows, ...
    lines = [
        f"steps            {result['steps']}",
        f"time             {format_duration(result['seconds'])} "
        f"({format_duration(result['train_seconds'])} in training steps)",
        f"tokens           {result['tokens']:,} processed, {result['trained_tokens']:,} "
        + ("trained" if unit == "tokens" else f"{unit} trained on"),
        f"throughput       {result['tokens_per_s']:,.0f} tokens/s",
        f"first/final loss {fmt(result.get('first_loss'))} -> {fmt(result.get('final_loss'))}",
    ]
    if result.get("eval_loss") is not None:
        lines.append(f"eval loss        {fmt(result.get('first_eval_loss'))} -> {fmt(result['eval_loss'])}")
        first = result.get("first_eval_loss")
        if unit == "tokens":  # perplexity is the exponential of a mean token cross-entropy only
            lines.append(f"eval perplexity  {'-' if first is None else f'{perplexity(first):.2f}'} -> "
                         f"{perplexity(result['eval_loss']):.2f}")
    if result.get("n_answered"):
        lines.append(f"answers matched  exact {_share(result, 'exact_match')}, "
                     f"normalised {_share(result, 'normalized_match')}")
    estimate = (f"; estimated {result['memory_estimate_gib']:.2f}" if result.get("memory_estimate_gib")
                else "")
    lines.append(f"memory           {result['memory_gib']:.2f} GiB ({result['memory_kind']}{estimate})")
    return "\n".join(lines)
