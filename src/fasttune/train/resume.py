"""Where a training run starts: the newest checkpoint that reads back (`resume`), or step 0.

Resuming restores the adapter, optimizer, schedule, fp16 scaler, random generators and data position,
and says which newer checkpoints it skipped and why. It deletes nothing: a run directory whose
checkpoints all fail to read back is an error that lists them, and a fresh start into a directory that
holds an earlier run's checkpoints is refused (the CLI removes them only with --overwrite).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fasttune.run_dir import RunDir, RunDirError
from fasttune.train.checkpoint import (
    Checkpoint,
    load_checkpoint,
    load_resumable,
    set_rng_states,
    stale_temporaries,
    step_dirs,
    verify,
)


def find_start(run_dir: str | Path, resume: bool | str, log: Callable[[str], None]) -> Checkpoint | None:
    """The checkpoint to continue from (None: start at step 0), or RunDirError when neither is allowed.

    resume: True for the newest checkpoint of run_dir that reads back, or one checkpoint directory's path.
    """
    if isinstance(resume, str):
        return _named(Path(resume), log)
    run = RunDir(run_dir)
    for tmp in stale_temporaries(run.root):
        log(f"  {tmp}: a checkpoint write that did not finish (its process ended); not used")
    if not resume:
        if step_dirs(run.root):
            raise RunDirError(f"{run.checkpoints}: checkpoints of an earlier run; continue it with --resume, "
                              "or replace it with --overwrite")
        return None
    ckpt, skipped = load_resumable(run.root)
    for path, why in skipped:
        log(f"  skipped checkpoint {path}: {why}")
    if ckpt is None and skipped:
        raise RunDirError(f"--resume: no checkpoint in {run.checkpoints} reads back "
                          f"({'; '.join(f'{p.name}: {why}' for p, why in skipped)}); nothing was changed. "
                          "Start again with --overwrite")
    if ckpt is None:
        log(f"no checkpoint in {run.checkpoints} yet; starting from step 0")
    return ckpt


def _named(path: Path, log: Callable[[str], None]) -> Checkpoint:
    """The checkpoint directory a user named, verified against its manifest before it is loaded."""
    if not path.name.startswith("step-") or not path.name[5:].isdigit():
        raise RunDirError(f"resume {path}: not a checkpoint directory (output_dir/checkpoints/step-N)")
    reason = verify(path)
    if reason is not None:
        raise RunDirError(f"resume {path}: {reason}; nothing was changed")
    try:
        ckpt = load_checkpoint(path)
    except Exception as e:  # noqa: BLE001 -- any unreadable file: say which checkpoint and why
        raise RunDirError(f"resume {path}: does not load ({type(e).__name__}: {e})") from None
    log(f"  resuming from {path}")
    return ckpt


def restore(ckpt: Checkpoint, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
            scheduler: Any, scaler: Any | None, batches: Any) -> None:
    """Put the trainable tensors, optimizer, schedule, scaler, generators and data position back."""
    differs = set(params) ^ set(ckpt.adapter)
    if differs:
        raise RunDirError(f"checkpoint {ckpt.path} does not match the model's trainable tensors "
                          f"(differs in {sorted(differs)[:3]}...): was the LoRA configuration changed?")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(ckpt.adapter[name])
    optimizer.load_state_dict(ckpt.optimizer)
    scheduler.load_state_dict(ckpt.scheduler)
    if scaler is not None and ckpt.scaler is not None:
        scaler.load_state_dict(ckpt.scaler)
    set_rng_states(ckpt.rng)
    batches.load_state_dict(ckpt.state["data_state"])
