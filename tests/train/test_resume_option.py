"""resume: true | latest | PATH. A named checkpoint directory continues exactly as the run that wrote it
went on; latest is the newest; anything else is an error naming the option."""

from __future__ import annotations

import argparse
import shutil

import pytest
import torch

from fasttune.config import (
    ConfigError,
    RunConfig,
    TrainConfig,
    add_config_flags,
    apply_overrides,
    config_from_args,
)
from fasttune.run_dir import RunDirError
from fasttune.train.loop import train_loop


def _cfg(**kw) -> TrainConfig:
    base = dict(learning_rate=1e-2, max_grad_norm=0.5, logging_steps=1, save_steps=2, eval_steps=0, seed=5,
                lr_scheduler_type="linear", warmup_steps=1, per_device_train_batch_size=2, max_steps=6,
                save_total_limit=0)
    return TrainConfig(**{**base, **kw})


def _trainables(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_resume_from_a_named_checkpoint_continues_that_run(toy, examples, make_stream, tmp_path):
    data = examples(16)
    model = toy(dropout=0.3)
    train_loop(model, _trainables(model), make_stream(data, 2, seed=11), _cfg(), tmp_path / "a",
               log=lambda s: None)
    final = {n: p.detach().clone() for n, p in _trainables(model).items()}
    step_2 = tmp_path / "a" / "checkpoints" / "step-2"
    assert step_2.is_dir()

    torch.manual_seed(99)
    model = toy(dropout=0.3)
    said: list[str] = []
    train_loop(model, _trainables(model), make_stream(data, 2, seed=11), _cfg(resume=str(step_2)),
               tmp_path / "b", log=said.append)
    assert f"  resuming from {step_2}" in said
    for name, p in _trainables(model).items():
        torch.testing.assert_close(p, final[name], rtol=0, atol=1e-6)

    with pytest.raises(RunDirError, match="not a checkpoint directory"):
        train_loop(toy(), _trainables(toy()), make_stream(data, 2, seed=11), _cfg(resume=str(tmp_path)),
                   tmp_path / "c", log=lambda s: None)
    broken = tmp_path / "copy" / "step-2"
    shutil.copytree(step_2, broken)
    (broken / "optimizer.pt").write_bytes(b"torn")
    with pytest.raises(RunDirError, match=f"resume {broken}: .*nothing was changed"):
        train_loop(toy(), _trainables(toy()), make_stream(data, 2, seed=11), _cfg(resume=str(broken)),
                   tmp_path / "c", log=lambda s: None)


def _parse(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_flags(parser)
    return config_from_args(parser.parse_args(argv))


def test_resume_values(tmp_path):
    assert _parse(["--resume"]).train.resume is True
    assert _parse(["--resume", "latest"]).train.resume is True
    assert _parse(["--resume", "false"]).train.resume is False
    assert _parse([]).train.resume is False
    assert _parse(["--resume", str(tmp_path)]).train.resume == str(tmp_path)
    assert apply_overrides(RunConfig(), {"resume": "LATEST"}, "t").train.resume is True
    with pytest.raises(ConfigError, match=r"resume .*nowhere: no such checkpoint directory"):
        apply_overrides(RunConfig(), {"resume": str(tmp_path / "nowhere")}, "t")
    with pytest.raises(ConfigError, match=r"resume: expected true, false, latest or a checkpoint directory"):
        apply_overrides(RunConfig(), {"resume": 3}, "t")
