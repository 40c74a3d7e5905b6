"""What a training step does when it goes wrong: NaN/Inf, and running out of GPU memory.

- A step whose loss or gradient norm is NaN or Inf updates nothing (the optimizer skips it; with fp16 the
  GradScaler also lowers its scale) and is counted. `max_nonfinite_steps` such steps in a row stop the run
  with `TrainingError`; since skipped steps change no weight, every checkpoint written is a good one.
  With fp16, an overflow of the scaled gradients while the loss is finite is the scaler finding its scale:
  counted, never a reason to stop.
- Out of GPU memory, `auto_batch_size` runs each micro-batch as 2 (then 4, ...) smaller ones over the same
  rows: the window's tokens and its loss normaliser are unchanged, so the update is the same as with the
  whole micro-batch. Without it, or with one row left, `out_of_memory_error` says what to change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

Batch = dict[str, torch.Tensor]


class TrainingError(RuntimeError):
    """Training cannot go on as configured (NaN/Inf every step, out of memory); the message says what to
    change."""


def check_finite(st: dict[str, Any], loss: float, grad_norm: float, scaled: bool, limit: int,
                 log: Callable[[str], None]) -> bool:
    """True for a step to keep; else count it in `st`, log it, and raise after `limit` in a row."""
    if math.isfinite(loss) and math.isfinite(grad_norm):
        st["nonfinite_in_a_row"] = 0
        return True
    st["skipped_steps"] += 1
    step = st["step"] + 1
    if scaled and math.isfinite(loss):
        log(f"step {step}: fp16 gradients overflowed; the update is skipped and the loss scale lowered")
        return False
    st["nonfinite_in_a_row"] += 1
    n = st["nonfinite_in_a_row"]
    log(f"step {step}: loss {loss} / gradient norm {grad_norm} is not finite; the step is skipped "
        f"({n} in a row, {st['skipped_steps']} in all)")
    if n >= limit:
        raise TrainingError(f"the loss or gradients were NaN/Inf for {n} steps in a row "
                            f"(steps {step - n + 1} to {step}); stopped. Their updates were skipped, so the "
                            "checkpoints are good. Lower learning_rate, check the data, use bf16 or fp32, or "
                            "raise max_nonfinite_steps")
    return False


def split_batch(batch: Batch, parts: int) -> list[Batch]:
    """`batch` as `parts` micro-batches of consecutive rows (fewer if it has fewer rows)."""
    rows = batch["input_ids"].shape[0]
    size = math.ceil(rows / parts)
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, rows, size)]


def is_out_of_memory(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError)


def out_of_memory_error(batch_rows: int, seq: int, estimate: str | None) -> TrainingError:
    said = f"; estimated {estimate}" if estimate else ""
    return TrainingError(
        f"out of GPU memory at {batch_rows} x {seq} tokens per micro-batch{said}. Lower "
        "per_device_train_batch_size and raise gradient_accumulation_steps as much (the same global batch), "
        "shorten max_seq_length, set gradient_checkpointing offload, load the base with load_in_4bit, or set "
        "auto_batch_size true to split micro-batches when memory runs out")
