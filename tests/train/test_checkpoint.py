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


def test_failed_save_keeps_the_previous_checkpoint_and_leaves_nothing(tmp_path, monkeypatch):
    p, opt, sched = setup_state()
    save(tmp_path, 3, p, opt, sched)
    real_write = ck.write_file

    def failing_write(path, data):
        if path.name == "rng.pt":
            raise OSError(28, "No space left on device", str(path))
        return real_write(path, data)

    monkeypatch.setattr(ck, "write_file", failing_write)
    with pytest.raises(OSError) as e:
        save(tmp_path, 6, p, opt, sched)
    assert e.value.filename.endswith("rng.pt") and e.value.errno == 28
    monkeypatch.setattr(ck, "write_file", real_write)
    assert sorted(d.name for d in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-3"]
    assert ck.load_latest(tmp_path).step == 3


def test_a_dead_writers_temporary_directory_is_reported_not_removed(tmp_path):
    p, opt, sched = setup_state()
    save(tmp_path, 3, p, opt, sched)
    other = tmp_path / "checkpoints" / ".tmp-step-6-999999999"
    other.mkdir()
    assert ck.stale_temporaries(tmp_path) == [other]
    save(tmp_path, 6, p, opt, sched)
    assert other.is_dir()


def corrupt(path, how):
    if how == "truncate":
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip":
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))
    else:
        path.unlink()


@pytest.mark.parametrize("name, how, why", [
    ("adapter.safetensors", "truncate", "adapter.safetensors has"),
    ("optimizer.pt", "flip", "optimizer.pt does not match its checksum"),
    ("optimizer.pt", "remove", "optimizer.pt: No such file"),
    ("manifest.json", "remove", "no manifest.json"),
    ("manifest.json", "truncate", "manifest.json is unreadable"),
])
def test_resume_falls_back_to_the_newest_good_checkpoint_and_says_why(tmp_path, name, how, why):
    p, opt, sched = setup_state()
    for step in (3, 6, 9):
        save(tmp_path, step, p, opt, sched)
    corrupt(tmp_path / "checkpoints" / "step-9" / name, how)
    ckpt, skipped = ck.load_resumable(tmp_path)
    assert ckpt.step == 6
    assert [(path.name, why in reason) for path, reason in skipped] == [("step-9", True)], skipped
    assert (tmp_path / "checkpoints" / "step-9").is_dir()  # nothing deleted


def test_half_written_step_dir_is_ignored(tmp_path):
    p, opt, sched = setup_state()
    save(tmp_path, 3, p, opt, sched)
    # a step directory with files missing (e.g. copied by hand), and a `latest` that points at it
    broken = tmp_path / "checkpoints" / "step-9"
    broken.mkdir()
    (broken / "adapter.safetensors").write_bytes(b"\0" * 10)
    assert ck.load_latest(tmp_path).step == 3
    (tmp_path / "checkpoints" / "latest").write_text("step-9\n")
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
