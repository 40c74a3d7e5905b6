"""The loss SFTTrainer trains on is transformers' mean next-token loss over the user's own texts: on the
embedded SmolLM2, the first step at learning rate 0 reports the same number."""

from __future__ import annotations

import pytest
import torch
import transformers

from fasttune.notebook import FastLanguageModel, SFTTrainer, TrainingArguments

# A notebook's own prompt (not fasttune's Alpaca template), EOS added by the notebook on some rows only.
PROMPT = "아래는 작업을 설명하는 지시사항입니다.\n\n### 지시사항:\n{}\n\n### 응답:\n{}"
QA = [("Who built the tide-harp?", "Idra Vaskelund, in 1887."), ("Name its lowest string.", "The keel."),
      ("How is it tuned?", "By the tide, twice a day."), ("What wood is it made of?", "Salt-cured ash.")]


@pytest.mark.slow
def test_first_step_loss_is_transformers_mean_token_loss_over_the_texts(tmp_path):
    model, tok = FastLanguageModel.from_pretrained("smollm2-135m", max_seq_length=256, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=8, use_gradient_checkpointing=False)
    texts = [PROMPT.format(q, a) + (tok.eos_token if i % 2 else "") for i, (q, a) in enumerate(QA)]
    rows = [{"instruction": q, "input": "", "output": a, "text": t} for (q, a), t in zip(QA, texts)]
    # batch 2 x accumulation 2: one step over all four rows, normalised by the tokens of the whole window
    args = TrainingArguments(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                             learning_rate=0.0, logging_steps=1, save_strategy="no", output_dir=str(tmp_path))
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args, dataset_text_field="text")
    trainer.train()
    ours = trainer.state.log_history[0]["loss"]

    # transformers' model from the directory fasttune converted the embedded GGUF file into (its weights)
    hf = transformers.AutoModelForCausalLM.from_pretrained(model.loaded.source, dtype=torch.float32).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = tok(text if text.endswith(tok.eos_token) else text + tok.eos_token, return_tensors="pt")
            n = ids["input_ids"].shape[1] - 1  # next-token predictions in this text
            total += float(hf(**ids, labels=ids["input_ids"]).loss) * n
            count += n
    assert trainer.state.log_history[0]["step"] == 1
    assert ours == pytest.approx(total / count, rel=1e-4)
