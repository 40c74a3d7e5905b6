"""A full disk, a read-only output: one line naming the path, exit status 2, the previous checkpoint intact.

These mount a small tmpfs and a read-only bind mount, so they need root and a mount namespace that permits
it (CI runs as root); elsewhere they skip and say why.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest
import torch
from fault_jobs import train_args

import fasttune.train.checkpoint as ck
from fasttune.cli import main
from fasttune.config import TrainConfig
from fasttune.train.optim import build_optimizer, build_scheduler


def _mount(*args: str) -> None:
    done = subprocess.run(["mount", *args], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount {' '.join(args)} is not permitted here: {done.stderr.strip()}")


@pytest.fixture
def mounts(tmp_path):
    """mounts(kind, path, ...) mounts and unmounts at the end of the test."""
    made = []

    def mount(kind, path, size="256k", source=None):
        path.mkdir(parents=True, exist_ok=True)
        if shutil.which("mount") is None:
            pytest.skip("no mount command")
        if kind == "tmpfs":
            _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
        else:  # a read-only view of `source`
            _mount("--bind", str(source), str(path))
            made.append(path)
            _mount("-o", "remount,ro,bind", str(path))
            return path
        made.append(path)
        return path

    yield mount
    for path in reversed(made):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def state(size):
    p = torch.nn.Parameter(torch.randn(size))
    opt = build_optimizer([p], TrainConfig(learning_rate=1e-2))
    sched = build_scheduler(opt, TrainConfig(learning_rate=1e-2), 10)
    p.grad = torch.ones_like(p)
    opt.step()
    return p, opt, sched


def test_checkpoint_on_a_full_disk_keeps_the_previous_one(tmp_path, mounts):
    disk = mounts("tmpfs", tmp_path / "disk", size="512k")
    p, opt, sched = state(10_000)  # about 120 KiB per checkpoint: the fourth does not fit
    saved = []
    with pytest.raises(OSError) as e:
        for step in range(1, 10):
            ck.save_checkpoint(disk, step, {"w": p}, opt, sched, None, ck.rng_states(), {}, {})
            saved.append(step)
    assert e.value.errno == 28 and str(disk) in e.value.filename
    assert len(saved) >= 1
    assert not ck.stale_temporaries(disk) and not list((disk / "checkpoints").glob(".tmp-*"))
    assert ck.load_latest(disk).step == saved[-1]


def test_train_on_a_full_disk_is_one_line_and_keeps_its_checkpoints(tmp_path, mounts, tiny_llama, train_file,
                                                                     capsys):
    # the checkpoints fit; the adapter directory, with the tokenizer's files, does not
    disk = mounts("tmpfs", tmp_path / "disk", size="1m")
    assert main(train_args(tiny_llama, train_file, disk / "run")) == 2
    err = one_line(capsys)
    assert "No space left on device" in err and str(disk / "run") in err
    assert ck.load_latest(disk / "run").step == 2
    assert not any(p.name.startswith(".adapter.tmp") for p in (disk / "run").iterdir())
    assert not (disk / "run" / "adapter").exists() and not (disk / "run" / "run.lock").exists()


def test_resume_on_a_read_only_mount_is_one_line(tmp_path, mounts, tiny_llama, train_file, capsys):
    run = tmp_path / "rw" / "run"
    assert main(train_args(tiny_llama, train_file, run, "--max_steps", "1")) == 0
    capsys.readouterr()
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    view = mounts("bind-ro", tmp_path / "ro", source=tmp_path / "rw")
    assert main(train_args(tiny_llama, train_file, view / "run", "--max_steps", "2", "--resume")) == 2
    err = one_line(capsys)
    assert "Read-only file system" in err and str(view / "run") in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert main(["merge", str(view / "run"), "--out", str(view / "merged"), "--no_check"]) == 2
    assert "Read-only file system" in one_line(capsys)
