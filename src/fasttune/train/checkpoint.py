"""Checkpoints: everything needed to continue a run, written atomically, verified when read back.

Layout under `run_dir/checkpoints/`:
```
step-6/
  adapter.safetensors   trainable tensors by parameter name
  optimizer.pt          optimizer.state_dict()   (torch.save; read back with weights_only=True)
  scheduler.pt          scheduler.state_dict()
  scaler.pt             GradScaler.state_dict()  (fp16 only)
  rng.pt                python / numpy / torch CPU / CUDA generator states
  trainer_state.json    step, data position, tokens, seconds, last losses
  manifest.json         size and sha256 of every file above -- written last
latest                  "step-6": the newest checkpoint written
```
A step directory is first written as `.tmp-step-6-<pid>` in the same folder, every file fsynced,
then renamed into place with one `os.replace`; `latest` is replaced the same way afterwards. A crash
at any moment therefore leaves the previous checkpoints as they were. A checkpoint counts only when
every file its manifest lists reads back with the recorded size and checksum; `load_resumable` takes the
newest such one and says why it skipped any newer. Nothing here deletes a checkpoint except the
`save_total_limit` pruning of the run that wrote them, and a temporary directory is removed only by the
process that made it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from fasttune.fs import fsync_path, write_file
from fasttune.run_dir import RunDir

LATEST = "latest"
STATE_FILE = "trainer_state.json"
MANIFEST = "manifest.json"
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

def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write_file(tmp, text.encode())
    os.replace(tmp, path)
    fsync_path(path.parent)


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Step directories, oldest first (by step number, not by name), complete or not."""
    root = RunDir(run_dir).checkpoints
    if not root.is_dir():
        return []
    found = [p for p in root.glob("step-*") if p.is_dir() and p.name[5:].isdigit()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Half-written checkpoint directories left by a process that ended mid-write (kill -9, power loss)."""
    root = RunDir(run_dir).checkpoints
    mine = f"-{os.getpid()}"
    return sorted(p for p in root.glob(".tmp-step-*") if not p.name.endswith(mine)) if root.is_dir() else []


def save_checkpoint(run_dir: str | Path, step: int, adapter_state: dict[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any | None,
                    rng: dict[str, Any], data_state: dict[str, Any], trainer_state: dict[str, Any],
                    save_total_limit: int = 0) -> Path:
    """Write checkpoints/step-`step`/ atomically, point `latest` at it, prune old ones; return its path.

    `data_state` and `trainer_state` must be JSON-serialisable (they are read back without pickle).
    `save_total_limit` > 0 keeps only that many newest step directories. On a failure (no space, read-only
    file system) the half-written directory is removed, the previous checkpoints stay as they were, and the
    OSError names the file it could not write.
    """
    root = RunDir(run_dir).checkpoints
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    files = {"adapter.safetensors": save_safetensors(
        {k: v.detach().contiguous().cpu() for k, v in adapter_state.items()}),
        "optimizer.pt": _torch_bytes(optimizer.state_dict()),
        "scheduler.pt": _torch_bytes(scheduler.state_dict()),
        "rng.pt": _torch_bytes(rng)}
    if scaler is not None:
        files["scaler.pt"] = _torch_bytes(scaler.state_dict())
    state = {**trainer_state, "step": step, "data_state": data_state}
    files[STATE_FILE] = json.dumps(state, indent=1).encode()
    manifest = {"step": step, "files": {name: {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                                        for name, data in files.items()}}

    tmp = root / f".tmp-step-{step}-{os.getpid()}"
    if tmp.exists():  # this process's own earlier attempt at this step
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        for name, data in files.items():
            write_file(tmp / name, data)
        write_file(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())  # last: marks the write complete
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

    if final.exists():  # the same step saved again (a run restarted from an earlier checkpoint)
        old = root / f".old-step-{step}-{os.getpid()}"
        os.replace(final, old)
        shutil.rmtree(old)
    os.replace(tmp, final)
    fsync_path(root)
    _write_text_atomic(root / LATEST, final.name + "\n")

    if save_total_limit > 0:
        for old in step_dirs(run_dir)[:-save_total_limit]:
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    return final


# ---- reading ---------------------------------------------------------------------------------

def verify(path: Path) -> str | None:
    """None if every file the manifest of checkpoint `path` lists reads back intact, else why not."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        listed = manifest["files"]
        step = manifest["step"]
    except FileNotFoundError:
        return f"no {MANIFEST} (its write did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    if step != int(path.name[5:]):
        return f"{MANIFEST} is for step {step}"
    missing = [name for name in REQUIRED if name not in listed]
    if missing:
        return f"{MANIFEST} lists no {missing[0]}"
    for name, want in listed.items():
        try:
            data = (path / name).read_bytes()
        except OSError as e:
            return f"{name}: {e.strerror or e}"
        if len(data) != want["size"]:
            return f"{name} has {len(data)} bytes, {want['size']} were written (truncated?)"
        if hashlib.sha256(data).hexdigest() != want["sha256"]:
            return f"{name} does not match its checksum (changed or corrupted)"
    return None


def is_complete(path: Path) -> bool:
    return verify(path) is None


def latest_checkpoint_dir(run_dir: str | Path) -> Path | None:
    """The newest step directory that verifies."""
    return next((path for path in reversed(step_dirs(run_dir)) if is_complete(path)), None)


def load_checkpoint(path: str | Path) -> Checkpoint:
    path = Path(path)
    load = lambda name: torch.load(path / name, map_location="cpu", weights_only=True)
    state = json.loads((path / STATE_FILE).read_text())
    return Checkpoint(
        path=path, step=int(state["step"]),
        adapter=load_safetensors((path / "adapter.safetensors").read_bytes()),
        optimizer=load("optimizer.pt"), scheduler=load("scheduler.pt"),
        scaler=load("scaler.pt") if (path / "scaler.pt").is_file() else None,
        rng=load("rng.pt"), state=state)


def load_resumable(run_dir: str | Path) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint that verifies and loads, and (path, reason) for each newer one skipped."""
    skipped: list[tuple[Path, str]] = []
    for path in reversed(step_dirs(run_dir)):
        reason = verify(path)
        if reason is None:
            try:
                return load_checkpoint(path), skipped
            except Exception as e:  # noqa: BLE001 -- any unreadable file means: try the previous one
                reason = f"does not load ({type(e).__name__}: {e})"
        skipped.append((path, reason))
    return None, skipped


def load_latest(run_dir: str | Path) -> Checkpoint | None:
    """The newest checkpoint of the run that verifies and loads, or None if there is none."""
    return load_resumable(run_dir)[0]
