"""The loop's invariants on a tiny random LlamaForCausalLM with LoRA (our real model and adapters)."""

from __future__ import annotations

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from fasttune.config import TrainConfig
from fasttune.lora.apply import apply_lora
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM
from fasttune.train.loop import train_loop
from fasttune.train.metrics import read_metrics

VOCAB = 37


def tiny_lora_llama(dropout: float = 0.0) -> tuple[LlamaForCausalLM, dict[str, torch.nn.Parameter]]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64))
    apply_lora(model, r=4, lora_alpha=8, lora_dropout=dropout, random_state=1)
    with torch.no_grad():  # B starts at zero; give it values so that A gets gradients from step 1
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
    return model, {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_accumulation_equals_big_batch_on_llama(examples, make_stream, tmp_path):
    data = examples(16, vocab=VOCAB)
    grads = {}
    for name, (b, a) in {"big": (8, 1), "accum": (2, 4)}.items():
        model, params = tiny_lora_llama()
        seen: list[list[torch.Tensor]] = []

        def hook(opt, args, kwargs, seen=seen, params=params):  # the optimizer steps one flat buffer
            seen.append([p.grad.clone() for p in params.values()])

        handle = register_optimizer_step_pre_hook(hook)
        cfg = TrainConfig(per_device_train_batch_size=b, gradient_accumulation_steps=a, max_steps=2,
                          learning_rate=1e-2, max_grad_norm=0.0, warmup_steps=0)
        try:
            train_loop(model, params, make_stream(data, b), cfg, tmp_path / name,
                       log=lambda s: None)
        finally:
            handle.remove()
        grads[name] = seen
    assert len(grads["big"]) == 2 and len(grads["big"][0]) == 2 * 7 * 2  # A and B of 7 projections x 2 layers
    for step in range(2):
        for g_big, g_acc in zip(grads["big"][step], grads["accum"][step]):
            assert g_big.abs().sum() > 0
            torch.testing.assert_close(g_acc, g_big, rtol=1e-4, atol=1e-6)


def test_resume_equals_uninterrupted_on_llama(examples, make_stream, tmp_path):
    data = examples(24, vocab=VOCAB)
    cfg = TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=6, save_steps=3,
                      learning_rate=5e-3, warmup_steps=1, lr_scheduler_type="cosine", seed=3,
                      logging_steps=1)
    quiet = lambda s: None

    model, params = tiny_lora_llama(dropout=0.2)
    train_loop(model, params, make_stream(data, 2, seed=4), cfg, tmp_path / "a", log=quiet)

    def crash(rec):
        if rec["step"] == 5:
            raise RuntimeError("simulated crash")

    model, params = tiny_lora_llama(dropout=0.2)
    with pytest.raises(RuntimeError):
        train_loop(model, params, make_stream(data, 2, seed=4), cfg, tmp_path / "b", log=quiet,
                   on_record=crash)
    cfg.resume = True
    model, params = tiny_lora_llama(dropout=0.2)
    train_loop(model, params, make_stream(data, 2, seed=4), cfg, tmp_path / "b", log=quiet)
    losses = [[r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl")] for d in ("a", "b")]
    assert len(losses[0]) == len(losses[1]) == 6
    assert max(abs(x - y) for x, y in zip(*losses)) < 1e-6
