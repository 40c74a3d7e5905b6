"""The fault suite: kill -9 a training run at random points, during steps and checkpoint writes, resume it
with --resume each time, and get the uninterrupted run's adapter byte for byte.

Each training process is a child of a forkserver that has imported torch, transformers and fasttune once,
so a kill costs a model load, not an interpreter start. Every step writes a checkpoint. Half the kills land
a random time after the child's first logged step (in a step, a checkpoint write, an eval or the final
adapter save); the other half as soon as a checkpoint's temporary directory appears, mid-write. One suite
runs packed rows, the other unpacked rows with an eval every few steps.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import pytest
from fault_jobs import run_cli, train_args

KILLS_PER_SUITE = 11  # two suites: more than 20 kills in all


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "transformers", "fasttune.cli", "fasttune.api", "fault_jobs"])
    return ctx


def adapter_bytes(run):
    return (run / "adapter" / "adapter_model.safetensors").read_bytes()


def logged_steps(run) -> int:
    try:
        return (run / "metrics.jsonl").read_text().count('"kind": "train"')
    except FileNotFoundError:
        return 0


def kill_and_resume(ctx, argv, run, rng, kills_wanted) -> int:
    """Run `argv`, kill -9 it, resume until it finishes; the number of kills."""
    kills = 0
    first = True
    while True:
        child = ctx.Process(target=run_cli, args=(argv + ([] if first else ["--resume"]),))
        child.start()
        first = False
        if kills < kills_wanted:
            start = logged_steps(run)
            while child.is_alive() and logged_steps(run) <= start:  # training has begun
                time.sleep(0.01)
            if kills % 2:  # mid-write: as soon as a checkpoint's temporary directory shows
                deadline = time.monotonic() + 2.0
                while child.is_alive() and time.monotonic() < deadline and not any(
                        (run / "checkpoints").glob(f".tmp-step-*-{child.pid}")):
                    time.sleep(0.002)
            else:
                time.sleep(rng.uniform(0.0, 0.3))
            if child.is_alive():
                os.kill(child.pid, signal.SIGKILL)
                child.join()
                if child.exitcode == 0:  # it finished between the liveness check and the kill
                    return kills
                assert child.exitcode == -signal.SIGKILL
                kills += 1
                continue
        child.join()
        assert child.exitcode == 0, f"the run ended with status {child.exitcode} after {kills} kills"
        return kills


@pytest.mark.slow
@pytest.mark.parametrize("name, extra", [
    ("packed", ["--packing", "on", "--max_steps", "40"]),
    ("with_eval", ["--packing", "off", "--max_steps", "30", "--eval_dataset", "EVAL", "--eval_steps", "4",
                   "--eval_answers", "0"]),
])
def test_killed_runs_resume_to_the_same_adapter(forkserver, tmp_path, tiny_llama, train_file, name, extra):
    extra = [str(train_file) if e == "EVAL" else e for e in extra]
    argv = lambda out: train_args(tiny_llama, train_file, out, "--save_total_limit", "3", *extra)
    straight = tmp_path / "straight"
    child = forkserver.Process(target=run_cli, args=(argv(straight),))
    child.start()
    child.join()
    assert child.exitcode == 0
    rng = random.Random(f"fault-suite-{name}")
    kills, chains = 0, 0
    while kills < KILLS_PER_SUITE:  # a run may finish before enough kills landed; then another one
        run = tmp_path / f"killed-{chains}"
        kills += kill_and_resume(forkserver, argv(run), run, rng, KILLS_PER_SUITE - kills)
        chains += 1
        assert adapter_bytes(run) == adapter_bytes(straight), f"after {kills} kills"
    assert kills >= KILLS_PER_SUITE


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_checkpoints_exits_and_resumes_to_the_same_adapter(forkserver, tmp_path, tiny_llama,
                                                                     train_file, signum):
    from fasttune.train.checkpoint import load_latest

    argv = lambda out, *more: train_args(tiny_llama, train_file, out, "--max_steps", "12",
                                         "--save_steps", "5", *more)
    straight = tmp_path / "straight"
    child = forkserver.Process(target=run_cli, args=(argv(straight),))
    child.start()
    child.join()
    assert child.exitcode == 0
    run = tmp_path / "run"
    child = forkserver.Process(target=run_cli, args=(argv(run),))
    child.start()
    while child.is_alive() and logged_steps(run) < 2:
        time.sleep(0.01)
    os.kill(child.pid, signum)
    child.join()
    assert child.exitcode == 128 + signum
    stopped_at = load_latest(run).step  # the checkpoint of the step it was in, not of a save_steps multiple
    assert stopped_at == logged_steps(run) and 2 <= stopped_at < 12
    assert not (run / "run.lock").exists() and not (run / "adapter").exists()
    child = forkserver.Process(target=run_cli, args=(argv(run, "--resume"),))
    child.start()
    child.join()
    assert child.exitcode == 0 and adapter_bytes(run) == adapter_bytes(straight)
