"""Training fields of transformers' TrainingArguments whose meaning fasttune keeps: the constant schedule
without a warm-up, checkpoints kept, when the trainer evaluates, an earlier run in output_dir, and the
fields it refuses rather than reinterpret."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import transformers

from fasttune.notebook import FastLanguageModel, SFTTrainer, TrainingArguments, unsloth_train
from fasttune.notebook.arguments import changed_fields, to_train_config
from fasttune.train.optim import build_scheduler

trl = pytest.importorskip("trl")
ROWS = [{"text": "The river runs past the mill and the old bridge."}, {"text": "Bread rises in a warm room."}]


def _lrs(args, steps: int) -> list[float]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cfg = to_train_config(args, device_type="cpu")
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.learning_rate)
    sched = build_scheduler(opt, cfg, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("kind", ["constant", "constant_with_warmup", "linear", "cosine"])
@pytest.mark.parametrize("warmup", [3, 0.25])
def test_each_schedule_sets_transformers_learning_rates(kind, warmup):
    """`constant` takes no warm-up in transformers (warmup_steps is not used); the others warm up."""
    args = TrainingArguments(output_dir="x", learning_rate=1e-3, lr_scheduler_type=kind, warmup_steps=warmup)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    steps = 12
    ref = transformers.get_scheduler(kind, opt, num_warmup_steps=3, num_training_steps=steps)
    theirs = []
    for _ in range(steps):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        ref.step()
    assert _lrs(args, steps) == pytest.approx(theirs, abs=1e-12)


def test_a_warm_up_with_the_constant_schedule_is_named():
    with pytest.warns(UserWarning, match="constant_with_warmup"):
        to_train_config(TrainingArguments(output_dir="x", lr_scheduler_type="constant", warmup_ratio=0.1),
                        device_type="cpu")


@pytest.mark.parametrize("limit,kept", [(None, 0), (0, 0), (-1, 0), (3, 3)])
def test_save_total_limit_none_keeps_every_checkpoint(limit, kept):
    assert to_train_config(TrainingArguments(output_dir="x", save_total_limit=limit),
                           device_type="cpu").save_total_limit == kept


@pytest.mark.parametrize("field", ["save_strategy", "eval_strategy"])
def test_best_strategies_are_refused(field):
    with pytest.raises(ValueError, match=field):
        to_train_config(TrainingArguments(output_dir="x", **{field: "best"}), device_type="cpu")


@pytest.mark.parametrize("field", ["save_strategy", "eval_strategy"])
def test_epoch_strategies_are_refused_where_epochs_do_not_end_on_a_step(field):
    with pytest.raises(ValueError, match=f"{field}='epoch' is not supported by GRPOTrainer"):
        to_train_config(TrainingArguments(output_dir="x", **{field: "epoch"}), device_type="cpu")


def test_per_rank_token_averaging_is_refused_under_torchrun(monkeypatch):
    args = TrainingArguments(output_dir="x", average_tokens_across_devices=False)
    with pytest.warns(UserWarning, match="average_tokens_across_devices"):
        to_train_config(args, device_type="cpu")  # one process: the same division
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="average_tokens_across_devices=False"):
        to_train_config(args, device_type="cpu")


def test_trls_config_on_a_cpu_reports_only_what_the_user_set(tmp_path):
    args = trl.SFTConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", weight_decay=0.01)
    assert set(changed_fields(args)) <= {"output_dir", "use_cpu", "report_to", "weight_decay", "bf16"}


def _train(model, tok, out, **kw):
    kw = {"per_device_train_batch_size": 2, "max_steps": 2, "learning_rate": 1e-3, "logging_steps": 1,
          "output_dir": str(out), "report_to": "none", **kw}
    eval_dataset = kw.pop("eval_dataset", None)
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=ROWS, eval_dataset=eval_dataset,
                         args=TrainingArguments(**kw), max_seq_length=32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer, trainer.train()


def _steps(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step-*"))


def _records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def peft(loaded):
    model, tok = loaded
    return FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False), tok


def test_the_trainer_evaluates_as_eval_strategy_says(peft, tmp_path):
    model, tok = peft
    _train(model, tok, tmp_path / "no", eval_dataset=ROWS)  # eval_strategy 'no': none, as transformers
    assert not [r for r in _records(tmp_path / "no") if r["kind"] == "eval"]
    _train(model, tok, tmp_path / "steps", eval_dataset=ROWS, eval_strategy="steps", eval_steps=1)
    assert [r["step"] for r in _records(tmp_path / "steps") if r["kind"] == "eval"] == [1, 2]
    _train(model, tok, tmp_path / "start", eval_dataset=ROWS, eval_strategy="steps", eval_steps=1,
           eval_on_start=True)
    assert [r["step"] for r in _records(tmp_path / "start") if r["kind"] == "eval"] == [0, 1, 2]
    with pytest.raises(ValueError, match="eval_strategy='steps' needs an eval_dataset"):
        _train(model, tok, tmp_path / "none", eval_strategy="steps")


def test_epoch_strategies_save_and_evaluate_where_trls_trainer_does(peft, model_dir, tokenizer, tmp_path):
    """save_strategy and eval_strategy 'epoch' as TRL's SFTTrainer (transformers' Trainer) runs them: 5 rows
    at batch 2 x accumulation 2 make 3 micro-batches an epoch, so 2 steps (the second of one micro-batch), and
    1.5 epochs 3 steps: saved and evaluated at each epoch's last step and at the end."""
    from datasets import Dataset

    rows = ROWS + [{"text": "A short row."}, {"text": "Rain fell all night."}, {"text": "The bell rang."}]
    kw = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "num_train_epochs": 1.5,
          "save_strategy": "epoch", "eval_strategy": "epoch", "logging_steps": 1, "report_to": "none"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    trl_args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, max_length=32, **kw)
    ref = trl.SFTTrainer(model=hf, processing_class=tokenizer, train_dataset=Dataset.from_list(rows),
                         eval_dataset=Dataset.from_list(ROWS), args=trl_args)
    assert ref.train().global_step == 3
    trl_saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "trl").glob("checkpoint-*"))
    trl_evals = [h["step"] for h in ref.state.log_history if "eval_loss" in h]
    assert trl_saved == [2, 3] and trl_evals == [2, 3]

    model, tok = peft
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, eval_dataset=ROWS, max_seq_length=32,
                         args=TrainingArguments(output_dir=str(tmp_path / "ours"), **kw))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert trainer.train().global_step == 3
    assert _steps(tmp_path / "ours") == [f"step-{n}" for n in trl_saved]
    assert [r["step"] for r in _records(tmp_path / "ours") if r["kind"] == "eval"] == trl_evals


def test_an_earlier_run_is_continued_or_replaced_only_when_asked(peft, tmp_path):
    """Running the training cell again: the earlier run's checkpoints are kept and the ways on named; with
    overwrite_output_dir=True they are replaced, with resume_from_checkpoint the run continues."""
    model, tok = peft
    trainer, _ = _train(model, tok, tmp_path, save_steps=1)
    with pytest.raises(ValueError, match=r"resume_from_checkpoint=True.*overwrite_output_dir=True"):
        trainer.train()
    assert _steps(tmp_path) == ["step-1", "step-2"]
    _, out = _train(model, tok, tmp_path, max_steps=1, overwrite_output_dir=True)
    assert out.global_step == 1
    assert _steps(tmp_path) == ["step-1"]
    assert [r["step"] for r in _records(tmp_path) if r["kind"] == "train"] == [1]
    trainer, _ = _train(model, tok, tmp_path / "more", max_steps=1)
    trainer.args.max_steps = 2
    assert trainer.train(resume_from_checkpoint=True).global_step == 2


def test_the_logged_loss_is_the_mean_of_the_steps_losses_as_in_transformers(model_dir, tmp_path):
    """With logging_steps 2 each logged loss is the mean of its two steps' losses (logging_steps 1), not the
    token-weighted loss of the interval, and training_loss is the mean over all steps either way."""
    rows = ROWS + [{"text": "A short row."}, {"text": "Rain fell on the roofs of the town all night long."}]
    runs = {}
    for every in (1, 2):
        model, tok = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=128,
                                                       dtype=torch.float32)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
        args = TrainingArguments(per_device_train_batch_size=1, max_steps=4, learning_rate=1e-2,
                                 logging_steps=every, output_dir=str(tmp_path / str(every)), report_to="none")
        trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args, max_seq_length=32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = trainer.train()
        runs[every] = ([h["loss"] for h in trainer.state.log_history if "loss" in h], out.training_loss)
    (single, loss1), (paired, loss2) = runs[1], runs[2]
    assert len(single) == 4 and len(set(single)) == 4
    assert paired == pytest.approx([(single[0] + single[1]) / 2, (single[2] + single[3]) / 2], rel=1e-6)
    assert loss1 == pytest.approx(sum(single) / 4, rel=1e-6) and loss2 == pytest.approx(loss1, rel=1e-6)
    tokens = [r for r in _records(tmp_path / "2") if r["kind"] == "train"]
    assert tokens[0]["loss"] != pytest.approx(paired[0], rel=1e-6)  # metrics.jsonl: per trained token


def test_after_a_resume_training_loss_and_rates_cover_the_steps_that_call_ran(model_dir, tmp_path):
    """As transformers' Trainer: a resumed train() reports the mean loss of its own steps (here 3 and 4,
    equal to the uninterrupted run's) and its rates over them, and logs a new interval from the checkpoint;
    the uninterrupted run's training_loss is the mean over all four."""
    import shutil

    rows = ROWS + [{"text": "A short row."}, {"text": "Rain fell on the roofs of the town all night long."}]

    def trainer_for(out):
        model, tok = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=128,
                                                       dtype=torch.float32)
        model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
        args = TrainingArguments(per_device_train_batch_size=1, max_steps=4, learning_rate=1e-2, save_steps=2,
                                 logging_steps=1, output_dir=str(out), report_to="none")
        return SFTTrainer(model=model, tokenizer=tok, train_dataset=rows, args=args, max_seq_length=32)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = trainer_for(tmp_path / "whole")
        out = whole.train()
        losses = [r["loss"] for r in whole.state.log_history]
        shutil.copytree(tmp_path / "whole", tmp_path / "resumed")
        shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "step-4")
        resumed = trainer_for(tmp_path / "resumed")
        again = unsloth_train(resumed, resume_from_checkpoint=True)   # Unsloth's name for trainer.train()
        # logging every 3 steps, the interval 1-3 straddles the step-2 checkpoint: the resumed run, as
        # transformers', logs at step 3 the mean of its own steps there (step 3 alone)
        logs = {}
        for name, resume in (("every3", False), ("every3_resumed", True)):
            if resume:
                shutil.copytree(tmp_path / "every3" / "checkpoints" / "step-2",
                                tmp_path / name / "checkpoints" / "step-2")
            trainer = trainer_for(tmp_path / name)
            trainer.args.logging_steps = 3
            trainer.train(resume_from_checkpoint=resume)
            logs[name] = [(r["step"], r["loss"]) for r in trainer.state.log_history]
    assert len(losses) == 4 and out.training_loss == pytest.approx(sum(losses) / 4, rel=1e-6)
    assert [r["step"] for r in resumed.state.log_history] == [3, 4]
    assert [r["loss"] for r in resumed.state.log_history] == pytest.approx(losses[2:], rel=1e-5)
    assert again.global_step == 4
    assert again.training_loss == pytest.approx((losses[2] + losses[3]) / 2, rel=1e-5)
    runtime = again.metrics["train_runtime"]
    assert again.metrics["train_steps_per_second"] == pytest.approx(2 / runtime, rel=1e-2)
    assert logs["every3"] == [(3, pytest.approx(sum(losses[:3]) / 3, rel=1e-5)),
                              (4, pytest.approx(losses[3], rel=1e-5))]
    assert logs["every3_resumed"] == [(3, pytest.approx(losses[2], rel=1e-5)),
                                      (4, pytest.approx(losses[3], rel=1e-5))]


@pytest.mark.parametrize("eval_batch", [3, 4])
def test_eval_loss_is_trls_mean_of_batch_means(model_dir, tokenizer, tmp_path, eval_batch):
    """eval_loss is what TRL's SFTTrainer.evaluate() reports: the eval rows in dataset order, in batches of
    per_device_eval_batch_size, each batch's mean token loss weighted by its rows (7 rows of unequal
    lengths in batches of 3 + 3 + 1 or 4 + 3, where a mean over all tokens, or over the batches, differs)."""
    import datasets

    words = "the tide wheel turns the moon pedal and the salt reed sings".split()
    rows = [{"text": " ".join(words[: 2 + (5 * i) % 11])} for i in range(7)]
    model, tok = FastLanguageModel.from_pretrained(model_name=str(model_dir), max_seq_length=128,
                                                   dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, use_gradient_checkpointing=False)
    args = TrainingArguments(per_device_train_batch_size=2, per_device_eval_batch_size=eval_batch,
                             max_steps=1, learning_rate=0.0, eval_strategy="steps", eval_steps=1,
                             logging_steps=1, output_dir=str(tmp_path / "ours"), report_to="none")
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=ROWS, eval_dataset=rows, args=args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    ours = [h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h]

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    trl_args = trl.SFTConfig(output_dir=str(tmp_path / "trl"), per_device_eval_batch_size=eval_batch,
                             bf16=False, report_to="none", max_length=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = trl.SFTTrainer(model=hf, args=trl_args, processing_class=tokenizer,
                                train_dataset=datasets.Dataset.from_list(ROWS),
                                eval_dataset=datasets.Dataset.from_list(rows)).evaluate()["eval_loss"]
    assert len(ours) == 1 and ours[0] == pytest.approx(theirs, rel=1e-5)
    # trainer.evaluate() as transformers', on its eval_dataset or on one passed in (learning rate 0: the
    # adapters did not move)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(theirs, rel=1e-5)
    out = trainer.evaluate(rows, metric_key_prefix="test")
    assert out["test_loss"] == pytest.approx(theirs, rel=1e-5) and out["test_runtime"] > 0

    # the mean over all the rows' tokens, and the plain mean of the batch means, are other numbers
    losses, counts = [], []
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(row["text"] + tokenizer.eos_token, return_tensors="pt")["input_ids"]
            losses.append(float(hf(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1))
            counts.append(ids.shape[1] - 1)
    batches = [slice(k, k + eval_batch) for k in range(0, len(rows), eval_batch)]
    means = [sum(losses[b]) / sum(counts[b]) for b in batches]
    for other in (sum(losses) / sum(counts), sum(means) / len(means)):
        assert abs(other - theirs) > 1e-3 * theirs


def test_evaluate_without_an_eval_dataset_says_so(peft):
    model, tok = peft
    trainer = SFTTrainer(model=model, tokenizer=tok, train_dataset=ROWS,
                         args=TrainingArguments(output_dir="unused", report_to="none"))
    with pytest.raises(ValueError, match="there is no eval_dataset"):
        trainer.evaluate()
    with pytest.raises(ValueError, match="ignore_keys is not supported"):
        trainer.evaluate(ROWS, ignore_keys=["past_key_values"])

