"""Model cards: every adapter a run saves, and every merged model and GGUF the CLI exports, carries a
README.md saying what it was trained from and how, how well, its prompt format and how to load it."""

from __future__ import annotations

import json

import pytest
import yaml
from huggingface_hub import ModelCard

from fasttune.cli import main
from fasttune.hub import gguf_card_path
from fasttune.model_card import card_text, facts_of
from fasttune.train.metrics import read_metrics


@pytest.fixture
def run(tiny_run):
    return tiny_run


def test_a_run_saves_a_card_with_its_adapter(run):
    card = ModelCard.load(run / "adapter" / "README.md")  # huggingface_hub parses it
    config = yaml.safe_load((run / "run.yaml").read_text())
    base = json.loads((run / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert card.data.library_name == "peft" and "fasttune" in card.data.tags
    text = card.text
    assert f"**{base}**" in text and config["data"]["dataset"] in text
    assert "| LoRA rank r | 4 |" in text and f"| learning_rate | {config['train']['learning_rate']} |" in text
    records = read_metrics(run / "metrics.jsonl")
    final_train = [r for r in records if r["kind"] == "train"][-1]
    final_eval = [r for r in records if r["kind"] == "eval"][-1]
    assert f"| final train loss | {final_train['loss']:.4f} |" in text
    assert f"| eval loss | {final_eval['eval_loss']:.4f}" in text
    assert "**alpaca** prompt template" in text and "### Instruction:" in text
    assert "PeftModel.from_pretrained" in text and "llama-cli" in text and "ollama create" in text


def test_each_kind_tells_how_to_load_it(run):
    facts = facts_of(run)
    merged = card_text("merged", facts, "me/merged")
    assert "AutoModelForCausalLM.from_pretrained(\"me/merged\")" in merged and "PeftModel" not in merged
    gguf = card_text("gguf", facts, "me/gguf", gguf_name="model-q8_0.gguf")
    assert "llama-cli -hf me/gguf" in gguf and "ollama run hf.co/me/gguf" in gguf
    assert "model-q8_0.gguf" in gguf
    assert ModelCard(gguf).data.library_name == "gguf"
    with pytest.raises(ValueError, match="kind: 'onnx'"):
        card_text("onnx", facts)


def test_hub_ids_only_enter_the_metadata(run):
    facts = facts_of(run)
    facts.config["data"]["dataset"] = ["yahma/alpaca-cleaned", str(run / "x.jsonl"), "builtin:lumen"]
    facts.base_model = "HuggingFaceTB/SmolLM2-135M-Instruct"
    card = ModelCard(card_text("adapter", facts, "me/a"))
    assert card.data.datasets == ["yahma/alpaca-cleaned"]
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert "`builtin:lumen`" in card.text


def test_every_mixed_dataset_is_listed_with_its_weight(run, tmp_path):
    from fasttune.config import RunConfig, apply_overrides

    cfg = apply_overrides(RunConfig(), {"dataset": [
        {"path": "yahma/alpaca-cleaned", "weight": 0.7},
        {"path": "json", "data_files": "b.jsonl", "weight": 0.3, "columns": {"output": "answer"}}]}, "test")
    cfg.save(tmp_path / "run.yaml")  # what the run directory records
    facts = facts_of(run)
    facts.config["data"] = yaml.safe_load((tmp_path / "run.yaml").read_text())["data"]
    card = ModelCard(card_text("adapter", facts, "me/a"))
    assert "`yahma/alpaca-cleaned` (weight 0.7)" in card.text
    assert "`json` (weight 0.3, columns {'output': 'answer'}, data_files b.jsonl)" in card.text
    assert "share of the training examples of each epoch" in card.text
    assert card.data.datasets == ["yahma/alpaca-cleaned"]


def test_a_chat_template_is_shown_as_written(run):
    facts = facts_of(run)
    facts.contract = {**facts.contract, "template": "chat",
                      "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}
    assert "{% for m in messages %}{{ m['content'] }}{% endfor %}" in card_text("adapter", facts)


@pytest.mark.slow
def test_merge_and_gguf_exports_write_cards(run, tmp_path):
    assert main(["merge", str(run), "--out", str(tmp_path / "merged"), "--no_check"]) == 0
    merged = ModelCard.load(tmp_path / "merged" / "README.md")
    assert merged.data.library_name == "transformers"
    assert "A fine-tuned model: LoRA merged into" in merged.text
    out = tmp_path / "model.gguf"
    assert main(["export", "gguf", str(run), "--out", str(out), "--type", "f16", "--no_check"]) == 0
    card = ModelCard.load(gguf_card_path(out))
    assert card.data.library_name == "gguf" and "model.gguf" in card.text
