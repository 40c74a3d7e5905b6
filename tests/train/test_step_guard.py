"""Steps that go wrong: NaN/Inf skipped and counted then a stop, out of memory split or explained, signals,
and the logged window averages after a resume."""

from __future__ import annotations

import math
import os
import signal

import pytest
import torch

from fasttune.config import TrainConfig
from fasttune.train.checkpoint import load_latest
from fasttune.train.interrupts import StopRequests, TrainingStopped
from fasttune.train.loop import train_loop
from fasttune.train.metrics import read_metrics
from fasttune.train.step_guard import TrainingError, out_of_memory_error, split_batch


def trainables(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def cfg_for(**kw) -> TrainConfig:
    base = dict(learning_rate=1e-2, max_grad_norm=1.0, logging_steps=1, save_steps=0, eval_steps=0, seed=5,
                lr_scheduler_type="constant", warmup_steps=0, per_device_train_batch_size=2)
    return TrainConfig(**{**base, **kw})


class Poisoned(torch.nn.Module):
    """The toy model, with a NaN loss on the forward calls numbered in `bad` (1-based)."""

    def __init__(self, inner, bad):
        super().__init__()
        self.inner, self.bad, self.calls = inner, set(bad), 0

    def forward(self, **batch):
        self.calls += 1
        out = self.inner(**batch)
        if self.calls in self.bad:
            out.loss_sum = out.loss_sum * float("nan")
        return out


def test_nonfinite_steps_are_skipped_and_counted(toy, examples, make_stream, tmp_path):
    lines = []
    model = Poisoned(toy(), bad={2, 3})
    params = trainables(model)
    before = {}

    def on_record(rec):
        before[rec["step"]] = {n: p.detach().clone() for n, p in params.items()}

    result = train_loop(model, params, make_stream(examples(20), 2), cfg_for(max_steps=5), tmp_path,
                        log=lines.append, on_record=on_record)
    assert result["skipped_steps"] == 2 and result["steps"] == 5
    for n in params:  # steps 2 and 3 changed nothing; step 4 did
        torch.testing.assert_close(before[3][n], before[1][n], rtol=0, atol=0)
        assert not torch.equal(before[4][n], before[3][n])
    assert sum("is not finite; the step is skipped" in line for line in lines) == 2
    losses = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"}
    assert math.isnan(losses[2]) and math.isfinite(losses[4])


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(toy, examples, make_stream, tmp_path):
    model = Poisoned(toy(), bad=range(3, 100))
    with pytest.raises(TrainingError, match="NaN/Inf for 3 steps in a row \\(steps 3 to 5\\)"):
        train_loop(model, trainables(model), make_stream(examples(20), 2),
                   cfg_for(max_steps=8, max_nonfinite_steps=3, save_steps=1), tmp_path, log=lambda s: None)
    assert load_latest(tmp_path).step == 4  # written during the streak: the weights of step 2


class SmallMemory(torch.nn.Module):
    """The toy model on a device that holds one row per forward."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, **batch):
        if batch["input_ids"].shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(**batch)


def test_auto_batch_size_splits_micro_batches_and_keeps_the_update(toy, examples, make_stream, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    data = examples(16)
    plain = toy()
    train_loop(plain, trainables(plain), make_stream(data, 4),
               cfg_for(max_steps=3, per_device_train_batch_size=4), tmp_path / "a", log=lambda s: None)
    lines = []
    small = SmallMemory(toy())
    result = train_loop(small, trainables(small), make_stream(data, 4),
                        cfg_for(max_steps=3, per_device_train_batch_size=4, auto_batch_size=True),
                        tmp_path / "b", log=lines.append)
    assert result["micro_splits"] == 4
    assert sum("out of GPU memory" in line for line in lines) == 2
    for (n, p), q in zip(trainables(plain).items(), trainables(small).values()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=n)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        small = SmallMemory(toy())
        train_loop(small, trainables(small), make_stream(data, 4),
                   cfg_for(max_steps=1, per_device_train_batch_size=4), tmp_path / "c", log=lambda s: None)


def test_out_of_memory_advice_names_what_to_change():
    text = str(out_of_memory_error(8, 2048, "71.2 GiB of 79.1 GiB"))
    for word in ("8 x 2048", "71.2 GiB", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "max_seq_length", "gradient_checkpointing", "load_in_4bit", "auto_batch_size"):
        assert word in text


def test_split_batch_keeps_rows_in_order():
    batch = {"input_ids": torch.arange(10).view(5, 2), "targets": torch.arange(10).view(5, 2)}
    parts = split_batch(batch, 2)
    assert [p["input_ids"].shape[0] for p in parts] == [3, 2]
    assert torch.equal(torch.cat([p["input_ids"] for p in parts]), batch["input_ids"])


def test_a_signal_stops_after_the_step_with_a_checkpoint(toy, examples, make_stream, tmp_path):
    model = toy()

    def on_record(rec):
        if rec["step"] == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    with StopRequests(lambda s: None) as stop, pytest.raises(TrainingStopped) as e:
        train_loop(model, trainables(model), make_stream(examples(20), 2), cfg_for(max_steps=50), tmp_path,
                   log=lambda s: None, on_record=on_record, stop_requested=stop)
    assert e.value.step == 3 and e.value.signum == signal.SIGTERM
    assert load_latest(tmp_path).step == 3
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored


def test_a_second_ctrl_c_stops_at_once():
    said = []
    # Python's own handler, as an interactive run has it (a background job inherits SIGINT ignored)
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with StopRequests(said.append) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            assert stop() == signal.SIGINT and "stopping after this step" in said[0]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
    finally:
        signal.signal(signal.SIGINT, inherited)


def test_resume_logs_the_same_window_averages(toy, examples, make_stream, tmp_path):
    """The checkpoint of step 4 falls inside the logging interval 4-6: after a resume from it, the average
    logged at step 6 still covers steps 4, 5 and 6."""
    data = examples(24)
    cfg = cfg_for(max_steps=6, logging_steps=3, save_steps=4)
    model = toy()
    train_loop(model, trainables(model), make_stream(data, 2), cfg, tmp_path / "a", log=lambda s: None)

    def die_at_6(rec):
        if rec["step"] == 6:
            raise KeyboardInterrupt  # before step 6's checkpoint: the newest is step 4's

    model = toy()
    with pytest.raises(KeyboardInterrupt):
        train_loop(model, trainables(model), make_stream(data, 2), cfg, tmp_path / "b", log=lambda s: None,
                   on_record=die_at_6)
    cfg.resume = True
    model = toy()
    lines = []
    train_loop(model, trainables(model), make_stream(data, 2), cfg, tmp_path / "b", log=lines.append)
    assert any("resumed from" in line and "step 4" in line for line in lines)
    a, b = ([r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if r["kind"] == "train"]
            for d in ("a", "b"))
    assert len(a) == 2 and a == b
