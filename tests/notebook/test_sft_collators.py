"""SFTTrainer's `data_collator`: transformers' collators train what they train under Unsloth's SFTTrainer
(the labels transformers' own collator makes, and the loss transformers computes from them); others are
refused by name."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

from fasttune import train_on_responses_only
from fasttune.notebook import FastLanguageModel, SFTTrainer, TrainingArguments

# chat texts as Unsloth's conversational notebooks build them; the tests give the tokenizer the pad token
# SmolLM2's own tokenizer has, its EOS <|im_end|>, which the texts also hold inside
TURNS = [("Who built the tide-harp?", "Idra Vaskelund."), ("Name its lowest string.", "The keel."),
         ("How is it tuned?", "By the tide."), ("What wood is it?", "Salt-cured ash.")]
CHAT = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n{}<|im_end|>\n"


def _texts(tok):
    return [{"text": CHAT.format(q, a)} for q, a in TURNS]


def _args(tmp_path, **kw):
    return TrainingArguments(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=1,
                             learning_rate=0.0, logging_steps=1, save_strategy="no", output_dir=str(tmp_path),
                             report_to="none", **kw)


@pytest.fixture
def loaded(loaded):
    loaded[1].pad_token = "<|im_end|>"
    return loaded


def _trained(model_dir, rows, tmp_path, collator=None, responses=False):
    model, tok = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=128,
                                                   dtype=torch.float32)
    tok.pad_token = "<|im_end|>"
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=1,
                                             use_gradient_checkpointing=False)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=_args(tmp_path),
                         data_collator=collator, dataset_text_field="text")
    if responses:
        train_on_responses_only(trainer, instruction_part="<|im_start|>user\n",
                                response_part="<|im_start|>assistant\n")
    trainer.train()
    return trainer


@pytest.mark.parametrize("make", [lambda tok: DataCollatorForSeq2Seq(tokenizer=tok),
                                  lambda tok: DataCollatorForLanguageModeling(tok, mlm=False)],
                         ids=["seq2seq", "language-modeling"])
def test_text_rows_train_the_labels_of_transformers_language_modeling_collator(loaded, model_dir, tmp_path,
                                                                             make):
    tok = loaded[1]
    trainer = _trained(model_dir, _texts(tok), tmp_path, make(tok))
    reference = DataCollatorForLanguageModeling(tok, mlm=False)
    pad = tok.pad_token_id
    for row in trainer.train_dataset:
        want = reference([{"input_ids": row["input_ids"]}])["labels"][0].tolist()
        assert row["labels"] == want
        assert pad in row["input_ids"] and -100 in row["labels"]  # <|im_end|> is the pad token: untrained


def test_train_on_responses_only_sets_seq2seq_and_its_labels_are_trained(loaded, model_dir, tmp_path):
    tok = loaded[1]
    with_collator = _trained(model_dir, _texts(tok), tmp_path / "a", DataCollatorForSeq2Seq(tokenizer=tok),
                             responses=True)
    without = _trained(model_dir, _texts(tok), tmp_path / "b", responses=True)
    got = [row["labels"] for row in with_collator.train_dataset]
    assert got == [row["labels"] for row in without.train_dataset]
    for (_, a), labels in zip(TURNS, got):  # the response's <|im_end|> and the EOS TRL adds stay trained
        assert tok.decode([t for t in labels if t != -100]) == a + "<|im_end|>\n<|im_end|>"


def test_tokenized_rows_with_labels_keep_them(loaded, model_dir, tmp_path):
    tok = loaded[1]
    rows = []
    for q, a in TURNS:
        prompt = tok(CHAT.format(q, "")[:-len("<|im_end|>\n")])["input_ids"]
        answer = tok(a + "<|im_end|>")["input_ids"]
        rows.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
    trainer = _trained(model_dir, rows, tmp_path, DataCollatorForSeq2Seq(tokenizer=tok))
    collated = DataCollatorForSeq2Seq(tokenizer=tok)([dict(r) for r in rows])
    for row, given, labels in zip(trainer.train_dataset, rows, collated["labels"].tolist()):
        assert row["labels"] == given["labels"] == labels[:len(given["labels"])]


def test_first_step_loss_is_transformers_loss_over_the_collated_batch(loaded, model_dir, tmp_path):
    tok = loaded[1]
    trainer = _trained(model_dir, _texts(tok), tmp_path, DataCollatorForSeq2Seq(tokenizer=tok))
    ours = trainer.state.log_history[0]["loss"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for row in _texts(tok):
            ids = tok(row["text"] + tok.eos_token if not row["text"].endswith(tok.eos_token)
                      else row["text"])["input_ids"]
            batch = collator([{"input_ids": ids}])
            n = int((batch["labels"][0, 1:] != -100).sum())
            total += float(hf(input_ids=batch["input_ids"], labels=batch["labels"]).loss) * n
            count += n
    assert ours == pytest.approx(total / count, rel=1e-4)


def _masked_lm(tok):
    collator = DataCollatorForLanguageModeling(tok, mlm=False)  # mlm=True needs a mask token at construction
    collator.mlm = True
    return collator


@pytest.mark.parametrize("make, match", [
    (lambda tok: DataCollatorForSeq2Seq(tokenizer=tok, label_pad_token_id=0), "label_pad_token_id=0"),
    (lambda tok: DataCollatorForSeq2Seq(tokenizer=tok, padding=False), "padding=False"),
    (lambda tok: _masked_lm(tok), "mlm=True"),
    (lambda tok: (lambda rows: rows), "data_collator function is not supported"),
])
def test_collators_that_train_something_else_are_refused(loaded, make, match):
    model, tok = loaded
    with pytest.raises(ValueError, match=match):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=_texts(tok), data_collator=make(tok))


def test_a_collator_with_rows_whose_mask_it_would_drop_is_refused(loaded):
    model, tok = loaded
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in TURNS]
    with pytest.raises(ValueError, match="messages rows"):
        SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, data_collator=DataCollatorForSeq2Seq(tok))
