"""The layout of a run directory, and how a run or adapter is located from a path the user names.

```
runs/<name>/
  run.yaml              the resolved configuration (re-runnable with --config)
  adapter/              adapter_model.safetensors + adapter_config.json (PEFT), tokenizer files,
    prompt_contract.json  template, BOS/EOS/pad ids and stop strings used in training
  metrics.jsonl         one JSON record per logged step and eval
  answers.json          the greedy answers to the shown held-out questions, before and after training
  loss.png              the loss curve
  checkpoints/          step-N/ directories and `latest` (train/checkpoint.py owns their insides)
  run.lock              while a run writes here: its PID and host (run_lock.py)
  exports/              what the web page's export button writes: merged/, <type>.gguf, ollama/
```
Every other module asks this one for these paths; nothing else spells the names.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RUN_YAML = "run.yaml"
ADAPTER_DIR = "adapter"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
CONTRACT_FILE = "prompt_contract.json"
METRICS_FILE = "metrics.jsonl"
LOSS_PLOT = "loss.png"
ANSWERS_FILE = "answers.json"
CHECKPOINTS = "checkpoints"
LOCK_FILE = "run.lock"
EXPORTS = "exports"


class RunDirError(Exception):
    """A run directory cannot be used as asked (an earlier run in the way, another writer, not a
    directory); the message names it and says what to do."""


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory; building one touches no file."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    @property
    def run_yaml(self) -> Path:
        return self.root / RUN_YAML

    @property
    def adapter(self) -> Path:
        return self.root / ADAPTER_DIR

    @property
    def contract(self) -> Path:
        return self.adapter / CONTRACT_FILE

    @property
    def metrics(self) -> Path:
        return self.root / METRICS_FILE

    @property
    def loss_plot(self) -> Path:
        return self.root / LOSS_PLOT

    @property
    def answers(self) -> Path:
        return self.root / ANSWERS_FILE

    @property
    def exports(self) -> Path:
        return self.root / EXPORTS

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def lock(self) -> Path:
        return self.root / LOCK_FILE

    def run_files(self) -> list[Path]:
        """The paths a training run writes here that exist now (an earlier run's, for a fresh one), and the
        exports made from it."""
        return [p for p in (self.run_yaml, self.adapter, self.metrics, self.loss_plot, self.answers,
                            self.checkpoints, self.exports) if p.exists()]

    def is_finished(self) -> bool:
        """A completed training run lives here: its adapter was saved."""
        return (self.adapter / ADAPTER_WEIGHTS).is_file() or (self.adapter / ADAPTER_CONFIG).is_file()


class RunNotFound(FileNotFoundError):
    """The path names neither a run directory nor an adapter directory; the message says which it is."""


@dataclass(frozen=True)
class Location:
    """What a user's path points at: the adapter directory, and the run it belongs to if there is one."""

    adapter_dir: Path
    run: RunDir | None

    def contract_path(self) -> Path | None:
        """The prompt contract saved with the adapter (or, for older layouts, beside run.yaml)."""
        for d in (self.adapter_dir, self.run.root if self.run is not None else None):
            if d is not None and (d / CONTRACT_FILE).is_file():
                return d / CONTRACT_FILE
        return None


def holds_adapter(path: str | Path) -> bool:
    """`path` is a run directory with an adapter, or an adapter directory itself."""
    p = Path(path)
    return (p / ADAPTER_DIR / ADAPTER_CONFIG).is_file() or (p / ADAPTER_CONFIG).is_file()


def locate(path: str | Path) -> Location:
    """`runs/x` (run.yaml + adapter/), `runs/x/adapter`, or any PEFT adapter directory -> Location.

    An adapter directory belongs to a run when its parent holds run.yaml.
    """
    p = Path(path)
    if (p / ADAPTER_DIR / ADAPTER_CONFIG).is_file():
        return Location(p / ADAPTER_DIR, RunDir(p))
    if (p / ADAPTER_CONFIG).is_file():
        return Location(p, RunDir(p.parent) if (p.parent / RUN_YAML).is_file() else None)
    if not p.exists():
        raise RunNotFound(f"{p}: no such run or adapter directory")
    if (p / RUN_YAML).is_file():
        raise RunNotFound(f"{p}: a run directory without {ADAPTER_DIR}/{ADAPTER_CONFIG}; "
                          "has training finished?")
    raise RunNotFound(f"{p}: not a run directory ({RUN_YAML} + {ADAPTER_DIR}/) or an adapter directory "
                      f"({ADAPTER_CONFIG})")
