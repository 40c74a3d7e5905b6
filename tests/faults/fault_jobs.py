"""Arguments of small training jobs for the fault tests."""

from __future__ import annotations

from pathlib import Path


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """`fasttune train` arguments for a job of a few seconds."""
    return ["train", "--model_name", str(model), "--dataset", str(data), "--eval_dataset", "none",
            "--max_seq_length", "64", "--per_device_train_batch_size", "4", "--max_steps", "2",
            "--learning_rate", "1e-2", "--logging_steps", "1", "--save_steps", "1", "--show_samples", "0",
            "--r", "4", "--warmup_steps", "0", "--report", "false", "--output_dir", str(out), *extra]


def run_cli(argv: list[str]) -> None:
    """A child process's whole life: the `fasttune` command with `argv`, its status as the exit code."""
    import sys

    from fasttune.cli import main

    sys.exit(main(argv))
