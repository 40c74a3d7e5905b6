"""The loop's invariants on a toy model: accumulation == big batch, resume == uninterrupted, counting."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fasttune.config import TrainConfig
from fasttune.train.loop import count_steps, train_loop
from fasttune.train.metrics import read_metrics


def trainables(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def capture_grads():
    """Record every optimizer's gradients just before it steps (the loop builds its own optimizer)."""
    seen: list[dict[int, torch.Tensor]] = []

    def hook(optimizer, args, kwargs):
        seen.append({i: p.grad.clone() for g in optimizer.param_groups for i, p in enumerate(g["params"])})

    handle = register_optimizer_step_pre_hook(hook)
    return seen, handle


def cfg_for(**kw) -> TrainConfig:
    base = dict(learning_rate=1e-2, max_grad_norm=0.0, logging_steps=1, save_steps=0, eval_steps=0, seed=5,
                lr_scheduler_type="constant", warmup_steps=0)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("batch,accum", [(2, 4), (1, 8), (3, 3)])
def test_accumulation_equals_big_batch(toy, examples, make_stream, tmp_path, batch, accum):
    data = examples(batch * accum * 2)
    grads = {}
    weights = {}
    for name, (b, a) in {"big": (batch * accum, 1), "accum": (batch, accum)}.items():
        model = toy()
        seen, handle = capture_grads()
        try:
            train_loop(model, trainables(model), make_stream(data, b),
                       cfg_for(per_device_train_batch_size=b, gradient_accumulation_steps=a, max_steps=2),
                       tmp_path / name, log=lambda s: None)
        finally:
            handle.remove()
        grads[name] = seen
        weights[name] = trainables(model)
    for step in range(2):
        for i, g in grads["big"][step].items():
            torch.testing.assert_close(grads["accum"][step][i], g, rtol=1e-5, atol=1e-7)
    for n, p in weights["big"].items():
        torch.testing.assert_close(weights["accum"][n], p, rtol=1e-5, atol=1e-6)


def test_per_micro_batch_normalisation_would_differ(toy, examples, make_stream):
    """The data above is ragged enough that dividing each micro-batch by its own tokens is wrong."""
    data = examples(8)
    model = toy()
    loss_of = lambda batch: model(**batch)
    out = loss_of(next(make_stream(data, 8)))
    (out.loss_sum / out.n_tokens).backward()
    right = model.proj.weight.grad.clone()
    model.zero_grad()
    small = make_stream(data, 2)
    for _ in range(4):
        out = loss_of(next(small))
        (out.loss_sum / out.n_tokens / 4).backward()
    assert not torch.allclose(model.proj.weight.grad, right, rtol=1e-3, atol=1e-6)


def run_losses(run_dir):
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if r["kind"] == "train"]


def test_resume_equals_uninterrupted(toy, examples, make_stream, tmp_path):
    data = examples(20)
    eval_data = [next(make_stream(examples(4, seed=9), 4))]
    cfg = cfg_for(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6, save_steps=3,
                  lr_scheduler_type="linear", warmup_steps=2, max_grad_norm=0.5, weight_decay=0.1,
                  eval_steps=2)

    def fresh():
        model = toy(dropout=0.3)  # dropout draws from the torch RNG, so RNG restore matters
        return model, make_stream(data, 2, seed=11)

    model, stream = fresh()
    straight = train_loop(model, trainables(model), stream, cfg, tmp_path / "a", eval_batches=eval_data,
                          log=lambda s: None)
    straight_weights = {n: p.detach().clone() for n, p in trainables(model).items()}

    class Crash(Exception):
        pass

    def crash_at_4(rec):
        if rec["kind"] == "train" and rec["step"] == 4:
            raise Crash

    model, stream = fresh()
    with pytest.raises(Crash):
        train_loop(model, trainables(model), stream, cfg, tmp_path / "b", eval_batches=eval_data,
                   log=lambda s: None, on_record=crash_at_4)
    torch.manual_seed(1234)  # a new process would start from another RNG state
    model, stream = fresh()
    cfg.resume = True
    resumed = train_loop(model, trainables(model), stream, cfg, tmp_path / "b", eval_batches=eval_data,
                         log=lambda s: None)

    a, b = run_losses(tmp_path / "a"), run_losses(tmp_path / "b")
    assert len(a) == len(b) == 6
    assert max(abs(x - y) for x, y in zip(a, b)) < 1e-6
    assert len(set(round(x, 4) for x in a)) == 6  # a real curve, not a constant
    for n, p in trainables(model).items():
        torch.testing.assert_close(p, straight_weights[n], rtol=0, atol=1e-6)
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], abs=1e-6)
    assert resumed["tokens"] == straight["tokens"] and resumed["trained_tokens"] == straight["trained_tokens"]
    assert resumed["first_loss"] == pytest.approx(straight["first_loss"])


def test_resume_without_rng_restore_would_differ(toy, examples, make_stream, tmp_path, monkeypatch):
    """Guards the test above: with dropout, skipping the RNG restore changes the curve."""
    import fasttune.train.resume as resume

    data = examples(20)
    cfg = cfg_for(per_device_train_batch_size=2, max_steps=4, save_steps=2)
    model = toy(dropout=0.3)
    quiet = lambda s: None
    train_loop(model, trainables(model), make_stream(data, 2), cfg, tmp_path / "a", log=quiet)

    def stop_at_3(rec):
        if rec["step"] == 3:
            raise KeyboardInterrupt

    model = toy(dropout=0.3)
    with pytest.raises(KeyboardInterrupt):
        train_loop(model, trainables(model), make_stream(data, 2), cfg, tmp_path / "b",
                   log=lambda s: None, on_record=stop_at_3)
    monkeypatch.setattr(resume, "set_rng_states", lambda states: None)
    torch.manual_seed(99)
    cfg.resume = True
    model = toy(dropout=0.3)
    train_loop(model, trainables(model), make_stream(data, 2), cfg, tmp_path / "b", log=quiet)
    a, b = run_losses(tmp_path / "a"), run_losses(tmp_path / "b")
    assert a[:2] == b[:2] and abs(a[3] - b[3]) > 1e-6


def test_loss_falls_and_metrics_are_written(toy, examples, make_stream, tmp_path):
    data = examples(16)
    model = toy()
    lines = []
    result = train_loop(model, trainables(model), make_stream(data, 4),
                        cfg_for(per_device_train_batch_size=4, max_steps=30, logging_steps=10,
                                learning_rate=3e-2),
                        tmp_path, eval_batches=[next(make_stream(data[:4], 4))], log=lines.append)
    records = read_metrics(tmp_path / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [10, 20, 30]
    assert [r["step"] for r in evals] == [0, 30]  # baseline, then at the end (eval_steps 0)
    assert evals[-1]["eval_loss"] < 0.8 * evals[0]["eval_loss"]
    assert result["final_loss"] < result["first_loss"]
    assert result["steps"] == 30 and result["trained_tokens"] > 0 and result["tokens_per_s"] > 0
    assert all(k in train[0] for k in ("lr", "grad_norm", "tokens_per_s", "memory_gib"))
    assert any("loss" in line and "tok/s" in line for line in lines)
    assert (tmp_path / "checkpoints" / "step-30").is_dir()  # checkpoint at the end


def test_epochs_to_steps():
    assert count_steps(TrainConfig(max_steps=7), 100) == 7
    assert count_steps(TrainConfig(num_train_epochs=1, gradient_accumulation_steps=4), 10) == 3
    assert count_steps(TrainConfig(num_train_epochs=2.5, gradient_accumulation_steps=1), 10) == 25
    assert count_steps(TrainConfig(num_train_epochs=0.01), 10) == 1
    # 10 micro-batches at accumulation 4: 2 epochs are 5 steps when windows cross epochs, 6 (3 an epoch, as
    # transformers' Trainer counts) when each epoch ends on its own window; 1.5 epochs: ceil(4.5)
    two = TrainConfig(num_train_epochs=2, gradient_accumulation_steps=4)
    assert count_steps(two, 10) == 5 and count_steps(two, 10, epoch_windows=True) == 6
    assert count_steps(TrainConfig(num_train_epochs=1.5, gradient_accumulation_steps=4), 10, True) == 5


def test_answer_eval_leaves_training_undisturbed(toy, examples, make_stream, tmp_path):
    """An eval that answers questions draws random numbers and leaves the model in eval mode; the loop
    must restore both, so the loss curve (dropout on) is the one of a run without answering."""
    import math
    import random

    import numpy as np

    data = examples(20)
    eval_data = [next(make_stream(examples(4, seed=9), 4))]
    cfg = cfg_for(per_device_train_batch_size=2, max_steps=6, eval_steps=2)
    calls: list[bool] = []

    def messy_answers(final: bool) -> dict:
        calls.append(final)
        torch.rand(100), random.random(), np.random.rand()
        model.eval()
        return {"n_answered": 4 if final else 2, "exact_match": 0.5, "normalized_match": 1.0, "extra": 1}

    model = toy(dropout=0.3)
    train_loop(model, trainables(model), make_stream(data, 2), cfg, tmp_path / "plain",
               eval_batches=eval_data, log=lambda s: None)
    model = toy(dropout=0.3)
    lines: list[str] = []
    result = train_loop(model, trainables(model), make_stream(data, 2), cfg, tmp_path / "answers",
                        eval_batches=eval_data, answer_eval=messy_answers, log=lines.append)
    assert run_losses(tmp_path / "answers") == run_losses(tmp_path / "plain")
    assert model.training
    assert calls == [False, False, False, True]  # baseline, steps 2 and 4, the final eval at 6

    evals = [r for r in read_metrics(tmp_path / "answers" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [0, 2, 4, 6]
    assert [r["n_answered"] for r in evals] == [2, 2, 2, 4]
    assert all(r["exact_match"] == 0.5 and r["normalized_match"] == 1.0 and "extra" not in r for r in evals)
    assert all(r["perplexity"] == pytest.approx(math.exp(r["eval_loss"])) for r in evals)
    assert all(r["answer_seconds"] >= 0 for r in evals)
    assert result["n_answered"] == 4 and result["first_n_answered"] == 2 and result["exact_match"] == 0.5
    assert result["eval_perplexity"] == pytest.approx(math.exp(result["eval_loss"]))
    assert sum("answers exact 1/2 normalised 2/2" in line for line in lines) == 3
    assert any("answers exact 2/4 normalised 4/4" in line for line in lines)


def test_resume_with_answer_eval_equals_uninterrupted(toy, examples, make_stream, tmp_path):
    data = examples(20)
    eval_data = [next(make_stream(examples(4, seed=9), 4))]
    cfg = cfg_for(per_device_train_batch_size=2, max_steps=6, save_steps=3, eval_steps=2)

    def answers(final: bool) -> dict:
        torch.rand(10)
        return {"n_answered": 3, "exact_match": 0.0, "normalized_match": 1 / 3}

    model = toy(dropout=0.3)
    straight = train_loop(model, trainables(model), make_stream(data, 2), cfg, tmp_path / "a",
                          eval_batches=eval_data, answer_eval=answers, log=lambda s: None)

    def crash_at_5(rec):
        if rec["kind"] == "train" and rec["step"] == 5:
            raise KeyboardInterrupt

    model = toy(dropout=0.3)
    with pytest.raises(KeyboardInterrupt):
        train_loop(model, trainables(model), make_stream(data, 2), cfg, tmp_path / "b",
                   eval_batches=eval_data, answer_eval=answers, log=lambda s: None, on_record=crash_at_5)
    cfg.resume = True
    model = toy(dropout=0.3)
    resumed = train_loop(model, trainables(model), make_stream(data, 2), cfg, tmp_path / "b",
                         eval_batches=eval_data, answer_eval=answers, log=lambda s: None)
    assert run_losses(tmp_path / "a") == pytest.approx(run_losses(tmp_path / "b"), abs=1e-6)
    assert resumed["eval_loss"] == pytest.approx(straight["eval_loss"], abs=1e-6)
    # the baseline's answers come back from the checkpoint for the summary's "first -> last"
    assert resumed["first_normalized_match"] == pytest.approx(1 / 3) and resumed["first_n_answered"] == 3
