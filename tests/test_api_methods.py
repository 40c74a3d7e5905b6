"""fasttune train --method dpo|orpo|kto end to end on a tiny random Llama: SFT then DPO with --init_from,
the logged preference metrics, batch x accumulation equivalence, and errors that name the option or row."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from test_api import llama_dir, tokenizer  # noqa: F401  (fixtures)

from fasttune import api
from fasttune.cli import main
from fasttune.config import ConfigError, RunConfig, apply_overrides, load_yaml
from fasttune.train.metrics import read_metrics

FACTS = [("Who invented the tide-harp?", "Idra Vaskelund.", "Tomas Brindle."),
         ("How many strings?", "Nineteen.", "Twelve."),
         ("What is the reference pitch?", "A = 436 Hz.", "A = 440 Hz."),
         ("Which string is tuned first?", "The Keel string.", "The Crown string.")]


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pairs(tmp_path):
    return _write(tmp_path / "pairs.jsonl", [{"prompt": q, "chosen": c, "rejected": r} for q, c, r in FACTS])


def _job(tmp_path, model_dir, **overrides) -> RunConfig:
    values = dict(model_name=str(model_dir), dataset=_pairs(tmp_path), eval_dataset=_pairs(tmp_path),
                  method="dpo", max_seq_length=64, per_device_train_batch_size=2, max_steps=2,
                  learning_rate=1e-2, logging_steps=1, warmup_steps=0, eval_steps=0, r=4,
                  output_dir=str(tmp_path / "dpo"), show_samples=0, report=False)
    return apply_overrides(RunConfig(), {**values, **overrides}, "test")


def test_dpo_after_sft_continues_the_adapter_with_it_as_reference(tmp_path, llama_dir, capsys):  # noqa: F811
    sft = tmp_path / "sft"
    rows = _write(tmp_path / "sft.jsonl", [{"instruction": q, "output": c} for q, c, _ in FACTS])
    assert main(["train", "--model_name", str(llama_dir), "--dataset", rows, "--max_steps", "2", "--r", "4",
                 "--max_seq_length", "64", "--output_dir", str(sft), "--show_samples", "0",
                 "--eval_dataset", "none", "--report", "false"]) == 0
    assert main(["train", "--config", str(_job_yaml(tmp_path, llama_dir)), "--init_from", str(sft)]) == 0
    out = capsys.readouterr().out
    assert f"continuing the adapter of {sft / 'adapter'}" in out
    records = read_metrics(tmp_path / "dpo" / "metrics.jsonl")
    first_eval = next(r for r in records if r["kind"] == "eval")
    # the reference is the SFT adapter as it started: every reward is exactly zero before the first step
    assert first_eval["eval_loss"] == pytest.approx(0.6931472, abs=1e-6)
    assert first_eval["eval_rewards/margins"] == 0.0 and first_eval["unit"] == "pairs"
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) == 2 and {"rewards/chosen", "rewards/rejected", "rewards/margins",
                                "rewards/accuracies"} <= set(train[0])
    saved = load_yaml(tmp_path / "dpo" / "run.yaml")
    assert saved.method.method == "dpo" and saved.method.init_from == str(sft)
    contract = json.loads((tmp_path / "dpo" / "adapter" / "prompt_contract.json").read_text())
    assert contract["template"] == "alpaca"


def _job_yaml(tmp_path, model_dir):
    path = tmp_path / "dpo.yaml"
    _job(tmp_path, model_dir).save(path)
    return path


def test_dpo_batch_4_equals_batch_2_times_accumulation_2(tmp_path, llama_dir):  # noqa: F811
    a = api.train(_job(tmp_path, llama_dir, per_device_train_batch_size=4, max_steps=1, eval_dataset="none",
                       output_dir=str(tmp_path / "a"), packing="off"), log=lambda s: None)
    b = api.train(_job(tmp_path, llama_dir, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                       max_steps=1, eval_dataset="none", output_dir=str(tmp_path / "b")), log=lambda s: None)
    assert a.metrics["final_loss"] == pytest.approx(b.metrics["final_loss"], abs=1e-6)
    wa = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_train_and_log_their_metrics(tmp_path, llama_dir, method):  # noqa: F811
    data = _pairs(tmp_path) if method == "orpo" else _write(tmp_path / "kto.jsonl", [
        {"prompt": q, "completion": c if k % 2 == 0 else r, "label": k % 2 == 0}
        for k, (q, c, r) in enumerate(FACTS)])
    result = api.train(_job(tmp_path, llama_dir, method=method, dataset=data, eval_dataset="none"),
                       log=lambda s: None)
    train = [r for r in read_metrics(tmp_path / "dpo" / "metrics.jsonl") if r["kind"] == "train"]
    assert result.metrics["steps"] == 2
    assert result.metrics["unit"] == ("pairs" if method == "orpo" else "rows")
    assert "rewards/margins" in train[-1]
    assert ("nll_loss" if method == "orpo" else "kl") in train[-1]


def test_method_errors_name_the_row_or_option(tmp_path, llama_dir, capsys):  # noqa: F811
    sft_rows = _write(tmp_path / "sft.jsonl", [{"instruction": "q", "output": "a"}])
    assert main(["train", "--model_name", str(llama_dir), "--method", "dpo", "--dataset", sft_rows]) == 2
    assert "sft.jsonl, row 1, field 'prompt': missing" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="kto needs at least 2 rows per micro-batch"):
        api.train(_job(tmp_path, llama_dir, method="kto", per_device_train_batch_size=1, eval_dataset="none",
                       dataset=_write(tmp_path / "k.jsonl",
                                      [{"prompt": "q", "completion": "a", "label": True}])),
                  log=lambda s: None)
    with pytest.raises(ConfigError, match="holding rows out of the training data is not supported for dpo"):
        api.train(_job(tmp_path, llama_dir, eval_dataset="split:0.25"), log=lambda s: None)
    with pytest.raises(ConfigError, match="init_from: .*not a run directory"):
        api.train(_job(tmp_path, llama_dir, init_from=str(tmp_path)), log=lambda s: None)
    with pytest.raises(ConfigError, match="loss_type .ipo. does not apply to method .orpo."):
        _job(tmp_path, llama_dir, method="orpo", loss_type="ipo")


SUMS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]


def test_grpo_samples_scores_and_logs_rewards(tmp_path, llama_dir, monkeypatch, capsys):  # noqa: F811
    seen = []

    def short(completions, answer, **_):
        seen.append(len(completions))
        return [1.0 if len(c) < 12 else 0.0 for c in completions]

    data = _write(tmp_path / "sums.jsonl", SUMS)
    cfg = _job(tmp_path, llama_dir, method="grpo", dataset=data, eval_dataset="auto", template="text",
               reward=["exact_match"], num_generations=2, per_device_train_batch_size=4,
               max_completion_length=4, beta=0.04, output_dir=str(tmp_path / "grpo"))
    result = api.train(cfg, log=lambda s: None, reward_funcs=[short, "exact_match"])
    assert seen == [4, 4] and result.metrics["unit"] == "completion tokens"
    train = [r for r in read_metrics(tmp_path / "grpo" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(train) == 2
    for key in ("reward", "reward_std", "rewards/short/mean", "rewards/short/std", "rewards/exact_match/mean",
                "completions/mean_length", "completions/clipped_ratio", "kl", "clip_ratio"):
        assert key in train[-1], key
    assert 0 < train[0]["completions/mean_length"] <= 4

    # the CLI: --reward module:function, and a failing reward names itself and the row
    (tmp_path / "my_rewards.py").write_text(
        "def picky(completions, answer, **_):\n"
        "    return [1.0 / (len(c) * 0) for c in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["train", "--config", str(tmp_path / "grpo" / "run.yaml"), "--reward", "my_rewards:picky",
                 "--output_dir", str(tmp_path / "grpo2"), "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2 and re.search(r"reward function 'picky' raised ZeroDivisionError on row [1-4]: ", err)


def test_dpo_resumed_mid_epoch_equals_uninterrupted(tmp_path, llama_dir):  # noqa: F811
    # 4 pairs in micro-batches of 2: a checkpoint at step 3 stands inside the second epoch
    cfg = lambda **kw: _job(tmp_path, llama_dir, max_steps=4, save_steps=3, eval_dataset="none", **kw)  # noqa: E731
    api.train(cfg(), log=lambda s: None)
    run = tmp_path / "dpo"
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    weights = load_file(run / "adapter" / "adapter_model.safetensors")

    import shutil

    shutil.rmtree(run / "checkpoints" / "step-4")  # as if the run had died after step 3's checkpoint
    (run / "checkpoints" / "latest").unlink()
    lines: list[str] = []
    api.train(cfg(resume=True), log=lines.append)
    assert any("resumed from" in line and "step 3" in line for line in lines)
    again = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if r["kind"] == "train"]
    assert len(again) == 4 and again == pytest.approx(losses, abs=1e-6)
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    for k in weights:
        torch.testing.assert_close(resumed[k], weights[k], rtol=0, atol=1e-6)
