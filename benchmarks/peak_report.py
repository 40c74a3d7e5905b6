"""Where a training step's peak GPU memory is: the tensors live at the moment of the peak, largest first, each
with the Python frames that allocated it.

The step runs under the CUDA caching allocator's history (`torch.cuda.memory._record_memory_history`); its
trace is replayed in order, counting bytes as `torch.cuda.max_memory_allocated` does (an allocation adds
its block's size, a free request takes it away), starting from what was allocated before the step. The
moment with the most bytes is the peak; the blocks live then, grouped by where they were allocated, are the
report. Allocations made before the step (weights, optimiser state) appear as one line, "before the step".

    with PeakRecorder() as rec:
        train_step()
    Path("peak.txt").write_text(rec.report(top=25))
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

GiB = 2**30
# frames from these packages name an allocation site; torch's own frames are skipped
OWN_FRAMES = ("fasttune", "benchmarks", "unsloth", "peft", "transformers", "trl", "bitsandbytes", "liger")


@dataclass
class Peak:
    bytes: int  # allocated at the peak, the bytes before the step included
    before: int  # allocated before the step
    live: list[tuple[int, str]]  # (bytes, allocation site) of the step's blocks live at the peak


def site(frames: list[dict], depth: int = 3) -> str:
    """The first `depth` frames of our packages or the peers' (innermost first), as file:line function."""
    picked = [f for f in frames if any(p in f.get("filename", "") for p in OWN_FRAMES)][:depth]
    if not picked:
        picked = frames[:1]
    return " < ".join(f"{f.get('filename', '?').rsplit('/', 1)[-1]}:{f.get('line', '?')} {f.get('name', '?')}"
                      for f in picked) or "(no frames)"


def live_at_peak(events: list[dict], before: int) -> Peak:
    """Replay allocator trace `events` (dicts with action, addr, size, frames) from `before` bytes."""
    live: dict[int, dict] = {}
    now = best = before
    best_live: list[dict] = []
    for e in events:
        action = e.get("action")
        if action == "alloc":
            live[e["addr"]] = e
            now += e["size"]
            if now > best:
                best, best_live = now, list(live.values())
        elif action in ("free_requested", "free_completed") and e["addr"] in live:
            # the first of the two counts; the block is gone from `live` by the second
            now -= live.pop(e["addr"])["size"]
    sites: dict[str, int] = defaultdict(int)
    for e in best_live:
        sites[site(e.get("frames") or [])] += e["size"]
    return Peak(best, before, sorted(((n, s) for s, n in sites.items()), reverse=True))


def format_peak(peak: Peak, top: int = 25) -> str:
    lines = [f"peak {peak.bytes / GiB:.3f} GiB: {peak.before / GiB:.3f} GiB before the step, "
             f"{(peak.bytes - peak.before) / GiB:.3f} GiB made by it and live at the peak", ""]
    for n, where in peak.live[:top]:
        lines.append(f"{n / GiB:8.3f} GiB  {where}")
    rest = peak.live[top:]
    if rest:
        other = f"{len(rest)} other site" + "s" * (len(rest) > 1)
        lines.append(f"{sum(n for n, _ in rest) / GiB:8.3f} GiB  ({other})")
    return "\n".join(lines) + "\n"


class PeakRecorder:
    """Records the allocator's history over a `with` block (CUDA); `report()` then says what the peak held.
    A diagnostic beside a measurement: where recording fails, the report says why and the step runs on."""

    def __init__(self, max_entries: int = 2_000_000) -> None:
        self.max_entries = max_entries
        self.peak: Peak | None = None
        self.error = ""

    def __enter__(self) -> PeakRecorder:
        import torch

        torch.cuda.synchronize()
        self.before = torch.cuda.memory_allocated()
        try:
            torch.cuda.memory._record_memory_history(max_entries=self.max_entries, stacks="python")
        except Exception as e:  # a torch without the allocator's history
            self.error = f"recording did not start: {type(e).__name__}: {e}"
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.error:
            return
        try:
            torch.cuda.synchronize()
            snapshot = torch.cuda.memory._snapshot()
            torch.cuda.memory._record_memory_history(enabled=None)
            self.peak = live_at_peak(snapshot["device_traces"][torch.cuda.current_device()], self.before)
        except Exception as e:
            self.error = f"no trace: {type(e).__name__}: {e}"

    def report(self, top: int = 25) -> str:
        if self.peak is None:
            return f"peak_report: {self.error or 'nothing recorded'}\n"
        return format_peak(self.peak, top)
