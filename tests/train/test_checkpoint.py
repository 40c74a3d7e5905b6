"""Checkpoints: round trip without pickle, atomic under a crash mid-save, pruning, fallbacks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

import fasttune.train.checkpoint as ck
from fasttune.config import TrainConfig
from fasttune.train.optim import build_optimizer, build_scheduler


def setup_state():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = build_optimizer([p], TrainConfig(learning_rate=1e-2))
    sched = build_scheduler(opt, TrainConfig(learning_rate=1e-2, warmup_steps=2), 10)
    p.grad = torch.ones_like(p)
    opt.step()
    sched.step()
    return p, opt, sched


def save(run_dir, step, p, opt, sched, **kw):
    return ck.save_checkpoint(run_dir, step, {"w": p}, opt, sched, None, ck.rng_states(),
                              {"epoch": 0, "index": step}, {"tokens": step * 10}, **kw)


def test_round_trip(tmp_path):
    p, opt, sched = setup_state()
    torch.manual_seed(7)
    random.seed(7)
    np.random.seed(7)
    save(tmp_path, 3, p, opt, sched)
    expected = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)

    got = ck.load_latest(tmp_path)
    assert got.step == 3 and got.state["data_state"] == {"epoch": 0, "index": 3}
    assert got.state["tokens"] == 30
    torch.testing.assert_close(got.adapter["w"], p.detach())
    p2 = torch.nn.Parameter(torch.zeros(4, 3))
    opt2 = build_optimizer([p2], TrainConfig(learning_rate=1e-2))
    opt2.load_state_dict(got.optimizer)
    torch.testing.assert_close(opt2.state[p2]["exp_avg"], opt.state[p]["exp_avg"])
    sched2 = build_scheduler(opt2, TrainConfig(learning_rate=1e-2, warmup_steps=2), 10)
    sched2.load_state_dict(got.scheduler)
    assert sched2.get_last_lr() == sched.get_last_lr()
    ck.set_rng_states(got.rng)
    assert (torch.rand(3), random.random(), np.random.rand())[1:] == expected[1:]
    ck.set_rng_states(got.rng)
    torch.testing.assert_close(torch.rand(3), expected[0])


def test_files_load_without_pickle(tmp_path):
    p, opt, sched = setup_state()
    path = save(tmp_path, 1, p, opt, sched)
    for name in ("optimizer.pt", "scheduler.pt", "rng.pt"):
        torch.load(path / name, weights_only=True)  # raises if anything needs the pickle machinery


def test_crash_mid_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    p, opt, sched = setup_state()
    save(tmp_path, 3, p, opt, sched)
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):
        if str(f).endswith("rng.pt"):
            raise OSError("disk full (simulated)")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(ck.torch, "save", dying_save)
    with pytest.raises(OSError, match="simulated"):
        save(tmp_path, 6, p, opt, sched)
    monkeypatch.setattr(ck.torch, "save", real_save)

    assert any(d.name.startswith(".tmp-step-6") for d in (tmp_path / "checkpoints").iterdir())
    assert not (tmp_path / "checkpoints" / "step-6").exists()
    assert ck.load_latest(tmp_path).step == 3
    save(tmp_path, 6, p, opt, sched)  # the next save cleans the leftover
    assert not any(d.name.startswith(".tmp") for d in (tmp_path / "checkpoints").iterdir())
    assert ck.load_latest(tmp_path).step == 6


def test_half_written_step_dir_is_ignored(tmp_path):
    p, opt, sched = setup_state()
    save(tmp_path, 3, p, opt, sched)
    # a step directory with files missing (e.g. copied by hand, or a non-atomic writer died), and a
    # `latest` that points at it
    broken = tmp_path / "checkpoints" / "step-9"
    broken.mkdir()
    (broken / "adapter.safetensors").write_bytes(b"\0" * 10)
    assert ck.load_latest(tmp_path).step == 3
    (tmp_path / "checkpoints" / "latest").write_text("step-9\n")
    assert ck.load_latest(tmp_path).step == 3
    (tmp_path / "checkpoints" / "latest").unlink()
    assert ck.load_latest(tmp_path).step == 3


def test_no_checkpoint(tmp_path):
    assert ck.load_latest(tmp_path) is None


def test_save_total_limit_keeps_the_newest(tmp_path):
    p, opt, sched = setup_state()
    for step in (2, 4, 6, 8, 10):
        save(tmp_path, step, p, opt, sched, save_total_limit=2)
    assert [d.name for d in ck.step_dirs(tmp_path)] == ["step-8", "step-10"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-10"
    for step in (12, 14):
        save(tmp_path, step, p, opt, sched, save_total_limit=0)
    assert len(ck.step_dirs(tmp_path)) == 4


def test_saving_the_same_step_again_replaces_it(tmp_path):
    p, opt, sched = setup_state()
    save(tmp_path, 3, p, opt, sched)
    with torch.no_grad():
        p.add_(1.0)
    save(tmp_path, 3, p, opt, sched)
    torch.testing.assert_close(ck.load_latest(tmp_path).adapter["w"], p.detach())
