"""notebook_gpu's step records on the CPU: fasttune's SFTTrainer and TRL's, on the same model, rows and
arguments at learning rate 0, draw the same rows into each step, train the same tokens and report the same
loss, step by step, across an epoch boundary that falls inside an accumulation window (what the GPU run
compares with Unsloth's trainer, which is TRL's)."""

import json
import warnings

import bench_train as bt
import instruction_data
import notebook_gpu as ng
import pytest
import torch


def test_the_ported_notebook_changes_only_its_imports():
    original, ported = ng.NOTEBOOK.read_text().splitlines(), ng.ported_notebook().splitlines()
    changed = [(a, b) for a, b in zip(original, ported) if a != b]
    assert len(original) == len(ported) and len(changed) == len(ng.IMPORTS)
    assert all(b.startswith("from fasttune import ") for _, b in changed)


@pytest.mark.slow
def test_both_trainers_draw_the_same_rows_and_report_the_same_losses(tmp_path, tokenizer_dir):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    import transformers

    from fasttune.notebook import FastLanguageModel, SFTTrainer, TrainingArguments

    bt.write_model_dir("tiny", tmp_path / "model", tokenizer_dir)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "model"))
    rows = [{"text": instruction_data.row_text(r)}
            for r in instruction_data.make_rows(22, seed=5, tokenizer=tok, lo=20, hi=120, median=50)]
    # 11 micro-batches of 2 rows an epoch: its 6th step has one, and the 7th and 8th are epoch 2's
    common = dict(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=8,
                  learning_rate=0.0, logging_steps=1, save_strategy="no", seed=3407, report_to="none")

    model, _ = FastLanguageModel.from_pretrained(str(tmp_path / "model"), max_seq_length=128,
                                                 dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    ours = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows,
                      args=TrainingArguments(output_dir=str(tmp_path / "ours"), **common))
    ours.train()

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "model"), dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), max_length=128, bf16=False, **common)
        data = datasets.Dataset.from_list(rows)
        theirs = trl.SFTTrainer(model=hf, train_dataset=data, processing_class=tok, args=args)
        theirs.train()

    a, b = ng.step_records(ours, fasttune=True), ng.step_records(theirs, fasttune=False)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, 9))
    assert len(a[5]["row_lengths"]) == 2 and len(a[6]["row_lengths"]) == 4
    for x, y in zip(a, b):
        assert sorted(x["row_lengths"]) == sorted(y["row_lengths"])
        assert x["trained_tokens"] == y["trained_tokens"] == x["trained_tokens_logged"]
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-4)
    json.dumps(a)  # the records go into the run's JSON as they are


@pytest.mark.parametrize("padding_free", [False, True])
def test_row_lengths_of_padded_and_padding_free_micro_batches(padding_free):
    """Unsloth turns on TRL's padding-free collator: a micro-batch of rows becomes one sequence whose
    position_ids restart at each row. Its rows and trained tokens must read as the padded batch's do."""
    trl_sft = pytest.importorskip("trl.trainer.sft_trainer")
    collate = trl_sft.DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)
    batch = collate([{"input_ids": [5, 6, 7, 4]}, {"input_ids": [8, 9]}, {"input_ids": [3, 2, 1]}])
    assert batch["input_ids"].shape[0] == (1 if padding_free else 3)
    counts = ng._counts([batch], fasttune=False)
    assert counts["row_lengths"] == [4, 2, 3]
    assert counts["trained_tokens"] == 3 + 1 + 2
