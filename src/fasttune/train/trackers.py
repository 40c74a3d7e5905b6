"""Experiment trackers (`report_to`): each metrics record of a run, and its configuration, sent through the
tracker's own client library, all of which work without a network.

- tensorboard: the `tensorboard` package (`pip install 'fasttune[tensorboard]'`); event files in
  `<run>/tensorboard/`.
- wandb: `wandb` (`fasttune[wandb]`); `<run>/wandb/`, online or offline as `WANDB_MODE` says (`offline`:
  no account, no network; `wandb sync` uploads it later).
- mlflow: `mlflow-skinny` (`fasttune[mlflow]`); `MLFLOW_TRACKING_URI` (a server, a database, or a
  `file:` store), else the SQLite store `<run>/mlflow.db`.
- trackio: `trackio` (`fasttune[trackio]`); its local database (`TRACKIO_DIR`, by default
  `~/.cache/huggingface/trackio`).

Metric names follow the transformers Trainer's: a train record's `loss` is `train/loss`, an eval record's
`eval_loss` is `eval/loss`, its `perplexity` is `eval/perplexity`; the step is the optimiser step. Only
numbers are sent (a record's `kind` and other text stay in metrics.jsonl).
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Protocol

from fasttune.config import ConfigError

# name -> (module imported, pip extra that installs it)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
    "trackio": ("trackio", "trackio"),
}
PROJECT = "fasttune"  # wandb project, MLflow experiment and trackio project unless the environment names one


class Tracker(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def finish(self) -> None: ...


def tracker_names(report_to: Iterable[str]) -> list[str]:
    """report_to as a list of tracker names ('none' alone means none); an unknown name is a ConfigError."""
    names = [n.strip().lower() for n in report_to if n.strip()]
    if names == ["none"]:
        return []
    for name in names:
        if name not in TRACKERS:
            raise ConfigError(f"report_to: unknown tracker '{name}' (known: {', '.join(TRACKERS)}, or none)")
    return list(dict.fromkeys(names))


def check_installed(report_to: Iterable[str]) -> list[str]:
    """The tracker names, each checked importable; an absent library is a ConfigError naming the extra."""
    names = tracker_names(report_to)
    for name in names:
        module, extra = TRACKERS[name]
        try:
            found = importlib.util.find_spec(module) is not None
        except ValueError:  # a module masked in sys.modules
            found = False
        if not found:
            raise ConfigError(f"report_to: {name} needs the {module} package; install it with "
                              f"pip install 'fasttune[{extra}]'")
    return names


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """A metrics record's numbers under the tracker names (`train/loss`, `eval/loss`, ...)."""
    kind = record.get("kind", "train")
    out = {}
    for key, value in record.items():
        if key in ("kind", "step") or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if kind == "eval":
            key = key.removeprefix("eval_")
        out[f"{kind}/{key}"] = float(value)
    return out


def flat_config(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'train': {'learning_rate': 2e-4}} -> {'train.learning_rate': 2e-4}; lists become text."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = " ".join(map(str, value)) if isinstance(value, list) else value
    return out


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], name: str):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def finish(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], name: str):
        import wandb

        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", PROJECT), name=name, dir=str(run_dir),
                              config=config)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], name: str):
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        experiment_name = os.environ.get("MLFLOW_EXPERIMENT_NAME", PROJECT)
        experiment = self.client.get_experiment_by_name(experiment_name)
        experiment_id = (experiment.experiment_id if experiment
                         else self.client.create_experiment(experiment_name))
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        params = [Param(k, str(v)) for k, v in flat_config(config).items()]
        for start in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=params[start:start + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def finish(self) -> None:
        self.client.set_terminated(self.run_id)


class TrackioTracker:
    def __init__(self, run_dir: Path, config: dict[str, Any], name: str):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", PROJECT), name=name,
                                config=flat_config(config), embed=False, auto_log_gpu=False,
                                auto_log_cpu=False)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.trackio.log(metrics, step=step)

    def finish(self) -> None:
        self.trackio.finish()


OPENERS: dict[str, Callable[[Path, dict[str, Any], str], Tracker]] = {
    "tensorboard": TensorBoardTracker,
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
    "trackio": TrackioTracker,
}


class Trackers:
    """The trackers of one run: `record(rec)` is train_loop's on_record; `finish()` closes each."""

    def __init__(self, report_to: Iterable[str], run_dir: str | Path, config: dict[str, Any], name: str):
        self.open: list[Tracker] = []
        try:
            for tracker in check_installed(report_to):
                try:
                    self.open.append(OPENERS[tracker](Path(run_dir), config, name))
                except Exception as e:  # noqa: BLE001  each library's own error: no login, a bad URI, ...
                    raise ConfigError(f"report_to: {tracker} could not start: {e}") from e
        except BaseException:
            self.finish()
            raise

    def record(self, rec: dict[str, Any]) -> None:
        values = scalars(rec)
        if values:
            for tracker in self.open:
                tracker.log(values, int(rec.get("step", 0)))

    def finish(self) -> None:
        while self.open:
            self.open.pop().finish()

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
