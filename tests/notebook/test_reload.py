"""Unsloth's reload cell: `FastLanguageModel.from_pretrained("lora_model")` on what `model.save_pretrained`
wrote loads the base model the adapter names, with the trained adapters on it."""

from __future__ import annotations

import warnings

import pytest
import torch

from fasttune.notebook import FastLanguageModel, SFTTrainer, TrainingArguments

ROWS = [{"text": "The river runs past the mill and the old bridge."}, {"text": "Bread rises in a warm room."}]


def test_a_saved_adapter_directory_reloads_as_the_trained_model(loaded, tmp_path):
    model, tok = loaded
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=False)
    args = TrainingArguments(per_device_train_batch_size=2, max_steps=3, learning_rate=5e-2,
                             output_dir=str(tmp_path / "out"), report_to="none")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SFTTrainer(model=model, tokenizer=tok, train_dataset=ROWS, args=args, max_seq_length=32).train()
    model.save_pretrained(str(tmp_path / "lora_model"))
    tok.save_pretrained(str(tmp_path / "lora_model"))
    ids = tok("Bread rises", return_tensors="pt")["input_ids"]
    FastLanguageModel.for_inference(model)
    with torch.no_grad():
        trained = model(input_ids=ids).logits

    again, tok2 = FastLanguageModel.from_pretrained(model_name=str(tmp_path / "lora_model"),
                                                   max_seq_length=128, dtype=torch.float32)
    FastLanguageModel.for_inference(again)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, trained)
    assert (again.lora_config.r, again.lora_config.lora_alpha) == (4, 8)
    assert again.prompt_contract is not None and tok2.eos_token_id == tok.eos_token_id
    assert any(p.requires_grad for p in again.model.parameters())  # trainable, as Unsloth's reload
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        FastLanguageModel.get_peft_model(again, r=4)


def test_a_directory_without_a_model_or_an_adapter_is_still_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="config.json"):
        FastLanguageModel.from_pretrained(model_name=str(tmp_path / "empty"), dtype=torch.float32)
