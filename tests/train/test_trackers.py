"""report_to: the metrics a run records reach TensorBoard, W&B, MLflow and trackio through their own clients,
offline, and are read back with each library's reader; unknown names and absent libraries are errors that
say what to do."""

from __future__ import annotations

import glob
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fasttune.cli import main
from fasttune.config import ConfigError, RunConfig, apply_overrides
from fasttune.train.trackers import Trackers, check_installed, flat_config, scalars

RECORDS = [
    {"kind": "train", "step": 1, "loss": 2.5, "lr": 1e-3, "grad_norm": 0.5, "unit": "rows"},
    {"kind": "train", "step": 2, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.4, "unit": "rows"},
    {"kind": "eval", "step": 2, "eval_loss": 2.2, "perplexity": 9.03, "eval_tokens": 40},
]
CONFIG = {"train": {"learning_rate": 1e-3, "report_to": ["tensorboard"]}, "lora": {"r": 4}}


def test_records_become_trainer_style_scalars():
    assert scalars(RECORDS[0]) == {"train/loss": 2.5, "train/lr": 1e-3, "train/grad_norm": 0.5}
    assert scalars(RECORDS[2]) == {"eval/loss": 2.2, "eval/perplexity": 9.03, "eval/tokens": 40.0}
    assert scalars({"kind": "train", "step": 3, "stopped": True}) == {}
    assert flat_config(CONFIG) == {"train.learning_rate": 1e-3, "train.report_to": "tensorboard",
                                   "lora.r": 4}


def tensorboard_scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def wandb_records(run_dir: Path) -> list:
    """The protobuf Records of an offline W&B run, decoded with wandb's own classes (wandb ships no Python
    reader for the file): its .wandb transaction log is a LevelDB-style log (7-byte header, 32 KiB blocks,
    records split in chunks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    block, pos, raw, pieces = 32768, 7, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        pieces += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            raw.append(pieces)
            pieces = b""
    records = []
    for blob in raw:
        records.append(pb.Record())
        records[-1].ParseFromString(blob)
    return records


def wandb_history(run_dir: Path) -> tuple[list[dict[str, str]], dict[str, str]]:
    """(history rows, config) of an offline W&B run, once W&B's service has written the run's end (it
    writes the file on its own after run.finish() returns)."""
    deadline = time.monotonic() + 60
    records = wandb_records(run_dir)
    while not any(r.WhichOneof("record_type") == "exit" for r in records) and time.monotonic() < deadline:
        time.sleep(0.2)
        records = wandb_records(run_dir)
    history, config = [], {}
    for record in records:
        which = record.WhichOneof("record_type")
        if which == "history":
            history.append({item.key or "/".join(item.nested_key): item.value_json
                            for item in record.history.item})
        elif which == "run":
            config.update({item.key: item.value_json for item in record.run.config.update})
    return history, config


def test_tensorboard_and_mlflow_file_store_read_back(tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    uri = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 asks for this opt-in to its file store
    with Trackers(["tensorboard", "mlflow"], tmp_path, CONFIG, "run-a") as trackers:
        for rec in RECORDS:
            trackers.record(rec)
        run_id = trackers.open[1].run_id
    tb = tensorboard_scalars(tmp_path / "tensorboard")
    assert tb["train/loss"] == [(1, 2.5), (2, 2.0)] and tb["eval/loss"] == [(2, pytest.approx(2.2))]
    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == [(1, 2.5), (2, 2.0)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "eval/perplexity")] == [(2, 9.03)]
    run = client.get_run(run_id)
    assert run.data.params["train.learning_rate"] == "0.001" and run.info.run_name == "run-a"
    assert run.info.status == "FINISHED"


def test_wandb_offline_reads_back(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with Trackers(["wandb"], tmp_path, CONFIG, "run-w") as trackers:
        for rec in RECORDS:
            trackers.record(rec)
    history, config = wandb_history(tmp_path)
    losses = [(int(h["_step"]), float(h["train/loss"])) for h in history if "train/loss" in h]
    assert losses == [(1, 2.5), (2, 2.0)]
    assert [float(h["eval/loss"]) for h in history if "eval/loss" in h] == [2.2]
    assert json.loads(config["lora"]) in ({"value": {"r": 4}}, {"r": 4})


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "TRACKIO_DIR": str(tmp_path / "trackio"),
            "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MLFLOW_ALLOW_FILE_STORE": "true",
            "MLFLOW_TRACKING_URI": f"file:{tmp_path / 'mlruns'}"}


TRACKIO_LOGS = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
                "run = sys.argv[1]; "
                "print(json.dumps([S.get_logs('fasttune', run), S.get_run_config('fasttune', run)]))")


def trackio_logs(tmp_path: Path, run: str) -> tuple[list[dict], dict]:
    """trackio's own reader, in a process of its own: trackio fixes its directory (TRACKIO_DIR) on import."""
    out = subprocess.run([sys.executable, "-c", TRACKIO_LOGS, run], env=_env(tmp_path), capture_output=True,
                         text=True, check=True).stdout
    logs, config = json.loads(out.strip().splitlines()[-1])
    return logs, config


def test_trackio_reads_back(tmp_path):
    script = ("import sys; from fasttune.train.trackers import Trackers; import json\n"
              f"records = json.loads({json.dumps(json.dumps(RECORDS))})\n"
              f"with Trackers(['trackio'], sys.argv[1], {CONFIG!r}, 'run-t') as t:\n"
              "    [t.record(r) for r in records]\n")
    subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=_env(tmp_path), check=True,
                   capture_output=True)
    logs, config = trackio_logs(tmp_path, "run-t")
    assert [(r["step"], r["train/loss"]) for r in logs if "train/loss" in r] == [(1, 2.5), (2, 2.0)]
    assert [r["eval/loss"] for r in logs if "eval/loss" in r] == [2.2]
    assert config["train.learning_rate"] == 1e-3


def test_a_tracker_that_cannot_start_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://x")
    with pytest.raises(ConfigError, match="report_to: mlflow could not start: "):
        Trackers(["tensorboard", "mlflow"], tmp_path, CONFIG, "run-x")


def test_an_absent_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"report_to: wandb needs the wandb package; install it with "
                                          r"pip install 'fasttune\[wandb\]'"):
        check_installed(["tensorboard", "wandb"])
    assert check_installed(["none"]) == []


def test_unknown_tracker_is_a_config_error(capsys):
    with pytest.raises(ConfigError, match=r"report_to: unknown tracker 'comet'"):
        apply_overrides(RunConfig(), {"report_to": ["tensorboard", "comet"]}, "test")
    cfg = apply_overrides(RunConfig(), {"report_to": "tensorboard, mlflow"}, "test")
    assert cfg.train.report_to == ["tensorboard", "mlflow"]
    assert main(["train", "--report_to", "neptune"]) == 2
    assert "report_to: unknown tracker 'neptune'" in capsys.readouterr().err


def test_notebook_report_to_maps_transformers_values(monkeypatch):
    from fasttune.notebook import TrainingArguments
    from fasttune.notebook.arguments import notebook_report_to, to_train_config

    assert notebook_report_to("none") == notebook_report_to(None) == notebook_report_to([]) == ["none"]
    assert notebook_report_to("tensorboard") == ["tensorboard"]
    assert notebook_report_to(["wandb", "trackio"]) == ["wandb", "trackio"]
    with pytest.raises(ValueError, match="TrainingArguments.report_to: unknown tracker 'comet_ml'"):
        notebook_report_to("comet_ml")
    monkeypatch.setitem(sys.modules, "wandb", None)
    monkeypatch.setitem(sys.modules, "trackio", None)
    assert notebook_report_to("all") == ["tensorboard", "mlflow"]  # every installed one, as transformers
    cfg = to_train_config(TrainingArguments(report_to=["tensorboard"], output_dir="x"), device_type="cpu")
    assert cfg.report_to == ["tensorboard"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_run import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=128)


@pytest.mark.slow
def test_a_cli_run_reports_to_all_four(tmp_path, tiny_llama, monkeypatch):
    """`fasttune train --report_to tensorboard wandb mlflow trackio`: each tracker holds the run's losses,
    equal to metrics.jsonl's."""
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    from mlflow.tracking import MlflowClient

    from fasttune.train.metrics import read_metrics

    rows = [{"instruction": f"Say the word number {i}.", "output": f"word {i}"} for i in range(8)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "tracked"
    subprocess.run([sys.executable, "-m", "fasttune", "train", "--model_name", str(tiny_llama), "--dataset",
                    str(data), "--eval_dataset", str(data), "--max_steps", "3", "--logging_steps", "1",
                    "--eval_steps", "0", "--show_samples", "0", "--eval_answers", "0", "--report", "false",
                    "--output_dir", str(run), "--report_to", "tensorboard", "wandb", "mlflow", "trackio"],
                   env=_env(tmp_path), check=True, capture_output=True, text=True)
    train = [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    final_eval = [r["eval_loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "eval"][-1]
    assert len(train) == 3
    approx = [(s, pytest.approx(v, rel=1e-6)) for s, v in train]

    assert tensorboard_scalars(run / "tensorboard")["train/loss"] == approx
    history, config = wandb_history(run)
    assert [(int(h["_step"]), float(h["train/loss"])) for h in history if "train/loss" in h] == approx
    assert "model" in config and "train" in config
    client = MlflowClient(tracking_uri=f"file:{tmp_path / 'mlruns'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("fasttune").experiment_id])
    history = client.get_metric_history(mlflow_run.info.run_id, "train/loss")
    assert [(m.step, m.value) for m in history] == approx
    assert mlflow_run.data.params["train.max_steps"] == "3"
    assert mlflow_run.data.metrics["eval/loss"] == pytest.approx(final_eval)
    logs, trackio_config = trackio_logs(tmp_path, "tracked")
    assert [(r["step"], r["train/loss"]) for r in logs if "train/loss" in r] == approx
    assert trackio_config["train.max_steps"] == 3
