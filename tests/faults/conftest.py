"""A tiny random Llama over SmolLM2's vocabulary and a small dataset: jobs that train in seconds on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROWS = [{"instruction": f"What is the code word number {i}?", "output": f"The code word is zebra-{i}."}
        for i in range(12)]


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from tiny_run import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def train_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path
