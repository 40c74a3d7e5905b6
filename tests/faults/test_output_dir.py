"""`fasttune train` never replaces an earlier run without --overwrite; one writer holds a run directory."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from fault_jobs import train_args

from fasttune.cli import main


def snapshot(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_finished_run_is_kept_unless_overwrite(tmp_path, tiny_llama, train_file, capsys):
    run = tmp_path / "run"
    assert main(train_args(tiny_llama, train_file, run)) == 0
    before = snapshot(run)
    assert "adapter/adapter_model.safetensors" in before and "run.lock" not in before
    capsys.readouterr()

    assert main(train_args(tiny_llama, train_file, run, "--learning_rate", "5e-2")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(run) in err and "holds a finished run" in err
    assert "--overwrite" in err and snapshot(run) == before

    (run / "notes.txt").write_text("mine")
    assert main(train_args(tiny_llama, train_file, run, "--learning_rate", "5e-2", "--overwrite")) == 0
    after = snapshot(run)
    assert after["notes.txt"] == b"mine"  # not a run file: left alone
    assert after["adapter/adapter_model.safetensors"] != before["adapter/adapter_model.safetensors"]
    assert "overwrite: false" in after["run.yaml"].decode()  # run.yaml reruns without replacing anything


def test_an_unfinished_run_and_a_bad_config_change_nothing(tmp_path, tiny_llama, train_file, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 1.0}\n')
    assert main(train_args(tiny_llama, train_file, run)) == 2
    assert "holds an earlier run (metrics.jsonl)" in capsys.readouterr().err
    # with --overwrite, an input that does not validate still writes nothing
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    assert main(train_args(tiny_llama, bad, run, "--overwrite")) == 2
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_output_dir_that_is_a_file(tmp_path, tiny_llama, train_file, capsys):
    (tmp_path / "f").write_text("")
    for out in (tmp_path / "f", tmp_path / "f" / "run"):
        assert main(train_args(tiny_llama, train_file, out)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "is a file, not a directory" in err


@pytest.mark.posix("a real file lock (fcntl.flock): a live holder refused, a dead one stale")
def test_a_second_writer_is_refused_naming_the_first(tmp_path, tiny_llama, train_file, capsys):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from fasttune.run_lock import RunLock; "
         f"lock = RunLock({str(run / 'run.lock')!r}).acquire(); print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ})
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(train_args(tiny_llama, train_file, run)) == 2
        err = capsys.readouterr().err
        assert f"pid {holder.pid} on host" in err and "another fasttune run is writing here" in err
    finally:
        holder.kill()
        holder.wait()
    # killed without releasing: the lock file stays, and the next run reports it as stale and goes on
    assert (run / "run.lock").is_file()
    assert main(train_args(tiny_llama, train_file, run)) == 0
    out = capsys.readouterr().out
    assert f"a stale lock of a run that ended without releasing it (pid {holder.pid}" in out
    assert not (run / "run.lock").exists()
