"""Every platform: `import fasttune` and a CPU training run without the POSIX-only modules (resource, fcntl,
os.sysconf), as on Windows; Apple's mps chosen and given a precision it supports."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fasttune.config import ConfigError
from fasttune.train import precision

MASKED_RUN = """
import os, sys, json
# the libraries fasttune uses import these modules on Linux (not on Windows): load them before the masks,
# so that what fails below is fasttune's own code
import torch, peft, safetensors.torch
from transformers import (AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationMixin, LlamaConfig,
                          LlamaForCausalLM)
sys.modules["resource"] = None
sys.modules["fcntl"] = None
sys.modules["msvcrt"] = None
del os.sysconf
import fasttune
from fasttune.config import RunConfig, apply_overrides
values = json.loads(sys.argv[1])
result = fasttune.train(apply_overrides(RunConfig(), values, "test"), log=print)
print("RESULT " + json.dumps([result.metrics["steps"], result.metrics["memory_kind"]]))
"""


@pytest.mark.slow
def test_a_cpu_run_without_posix_only_modules(tmp_path, tiny_run):
    rows = [{"instruction": f"Word {i}?", "output": f"W{i}."} for i in range(6)]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = dict(model_name=str(tiny_run.parent / "tiny-llama"), dataset=str(data), eval_dataset="none",
                  max_steps=2, r=4, show_samples=0, output_dir=str(tmp_path / "run"), device="cpu")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", MASKED_RUN, json.dumps(values)], env=env, capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    steps, memory_kind = json.loads(out.stdout.split("RESULT ")[-1])
    assert steps == 2 and memory_kind == "rss"  # psutil measures it on every platform
    assert "this platform has no file locks" in out.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_mps_is_chosen_after_cuda_and_trains_in_fp32_by_default(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    mps = precision.resolve_device("auto")
    assert mps == torch.device("mps") and precision.resolve_device("mps") == mps
    assert precision.resolve_precision("auto", mps) == "fp32"
    with pytest.raises(ConfigError, match=r"fp16 \(with loss scaling\) needs a CUDA GPU; use bf16 or fp32"):
        precision.resolve_precision("fp16", mps)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: False, raising=False)
    with pytest.raises(ConfigError, match="bf16 on mps needs macOS 14"):
        precision.resolve_precision("bf16", mps)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: True, raising=False)
    assert precision.resolve_precision("bf16", mps) == "bf16"


def test_mps_asked_for_where_there_is_none(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no Apple mps device; use --device cpu"):
        precision.resolve_device("mps")
