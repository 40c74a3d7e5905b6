"""The notebook model's Unsloth saving and Hub methods: merged and GGUF exports with model cards, and
uploads through huggingface_hub to the local stand-in of the Hub (tests/hub_stub.py)."""

from __future__ import annotations

import huggingface_hub
import pytest
import torch
from hub_stub import TOKEN, running_stub
from huggingface_hub import ModelCard

from fasttune.notebook import FastLanguageModel


@pytest.fixture
def notebook_model(tiny_run):
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=str(tiny_run.parent / "tiny-llama"),
                                                         max_seq_length=64, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=1)
    for name, p in model.model.named_parameters():  # B = 0 at init: make the adapter change the model
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model, tokenizer


def test_push_to_hub_sends_the_adapter_and_its_card(notebook_model, monkeypatch):
    model, tokenizer = notebook_model
    with running_stub() as stub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", stub.url)
        url = model.push_to_hub("me/nb-adapter", tokenizer, token=TOKEN)
    assert url.endswith("/me/nb-adapter/commit/abc123")
    (commit,) = stub.commits
    sent = set(commit.files)
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "README.md"} <= sent
    assert ModelCard(commit.files["README.md"].decode()).data.library_name == "peft"


def test_save_pretrained_merged_matches_the_model(notebook_model, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tokenizer = notebook_model
    model.save_pretrained_merged(tmp_path / "merged", tokenizer)
    assert ModelCard.load(tmp_path / "merged" / "README.md").data.library_name == "transformers"
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 200, 7]])
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        theirs = merged(input_ids=ids).logits
    assert torch.allclose(ours, theirs, atol=0.05, rtol=0.02)  # the merge is saved in bf16
    with pytest.raises(ValueError, match="save_method='merged_4bit' is not supported"):
        model.save_pretrained_merged(tmp_path / "m4", tokenizer, save_method="merged_4bit")


def test_push_to_hub_gguf_sends_the_file_and_its_card(notebook_model, monkeypatch):
    model, tokenizer = notebook_model
    with running_stub() as stub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", stub.url)
        model.push_to_hub_gguf("me/nb-gguf", tokenizer, quantization_method="f16", token=TOKEN)
    (commit,) = stub.commits
    assert set(commit.files) == {"model-f16.gguf", "README.md"}
    assert commit.files["model-f16.gguf"][:4] == b"GGUF"
    assert ModelCard(commit.files["README.md"].decode()).data.library_name == "gguf"
