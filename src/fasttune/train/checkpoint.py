"""Checkpoints: everything needed to continue a run, written atomically, and loaded back safely.

Layout under `run_dir/checkpoints/`:
```
step-6/
  adapter.safetensors   trainable tensors by parameter name
  optimizer.pt          optimizer.state_dict()   (torch.save; read back with weights_only=True)
  scheduler.pt          scheduler.state_dict()
  scaler.pt             GradScaler.state_dict()  (fp16 only)
  rng.pt                python / numpy / torch CPU / CUDA generator states
  trainer_state.json    step, data position, tokens, seconds, last losses -- written last
latest                  "step-6": the newest complete checkpoint
```
A step directory is first written as `.tmp-step-6-<pid>` in the same folder, every file fsynced,
then renamed into place with one `os.replace`; `latest` is replaced the same way afterwards. A crash
at any moment therefore leaves either the previous good checkpoint or the new one, never a mix, and
`load_latest` skips anything incomplete.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from fasttune.run_dir import RunDir

LATEST = "latest"
STATE_FILE = "trainer_state.json"
REQUIRED = ("adapter.safetensors", "optimizer.pt", "scheduler.pt", "rng.pt", STATE_FILE)


@dataclass
class Checkpoint:
    path: Path
    step: int
    adapter: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    scaler: dict[str, Any] | None
    rng: dict[str, Any]
    state: dict[str, Any]          # trainer_state.json: step, data_state, tokens, seconds, ...


# ---- random generators -----------------------------------------------------------------------

def rng_states() -> dict[str, Any]:
    """Every generator a training step draws from, in types torch.load(weights_only=True) accepts."""
    np_state = np.random.get_state(legacy=False)
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"state": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    n = states["numpy"]
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": n["state"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---- writing ---------------------------------------------------------------------------------

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Complete-looking step directories, oldest first (by step number, not by name)."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(run_dir: str | Path, step: int, adapter_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any | None,
                    rng: dict[str, Any], data_state: dict[str, Any], trainer_state: dict[str, Any],
                    save_total_limit: int = 0) -> Path:
    """Write checkpoints/step-`step`/ atomically, point `latest` at it, prune old ones; return its path.

    `data_state` and `trainer_state` must be JSON-serialisable (they are read back without pickle).
    `save_total_limit` > 0 keeps only that many newest step directories.
    """
    root = RunDir(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    for stale in root.glob(".tmp-step-*"):  # left by a crash mid-save; one writer per run directory
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    tmp.mkdir()

    save_file({k: v.detach().contiguous().cpu() for k, v in adapter_state.items()},
              str(tmp / "adapter.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    torch.save(rng, tmp / "rng.pt")
    state = {**trainer_state, "step": step, "data_state": data_state}
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))  # last: its presence marks completeness
    for f in tmp.iterdir():
        _fsync_path(f)
    _fsync_path(tmp)

    if final.exists():  # the same step saved again (a run restarted from an earlier checkpoint)
        old = root / f".old-step-{step}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    _fsync_path(root)
    _write_text_atomic(root / LATEST, final.name + "\n")

    if save_total_limit > 0:
        for old in step_dirs(run_dir)[:-save_total_limit]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


def clear_checkpoints(run_dir: str | Path) -> bool:
    """Remove every checkpoint of a run (a fresh run into an old directory); True if any existed."""
    root = RunDir(run_dir).checkpoints
    if not root.exists():
        return False
    had = bool(step_dirs(run_dir))
    shutil.rmtree(root)
    return had


# ---- reading ---------------------------------------------------------------------------------

def is_complete(path: Path) -> bool:
    if not all((path / name).is_file() for name in REQUIRED):
        return False
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("step") == int(path.name[5:])


def latest_checkpoint_dir(run_dir: str | Path) -> Path | None:
    """The directory `latest` names if complete, else the newest complete step directory."""
    root = RunDir(run_dir).checkpoints
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if named.name.startswith("step-") and named.is_dir() and is_complete(named):
            return named
    for path in reversed(step_dirs(run_dir)):
        if is_complete(path):
            return path
    return None


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    load = lambda name: torch.load(path / name, map_location="cpu", weights_only=True)
    state = json.loads((path / STATE_FILE).read_text())
    return Checkpoint(
        path=path, step=int(state["step"]), adapter=load_file(str(path / "adapter.safetensors")),
        optimizer=load("optimizer.pt"), scheduler=load("scheduler.pt"),
        scaler=load("scaler.pt") if (path / "scaler.pt").is_file() else None,
        rng=load("rng.pt"), state=state)


def load_latest(run_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint of the run, or None if there is none."""
    path = latest_checkpoint_dir(run_dir)
    return load_checkpoint(path) if path is not None else None
