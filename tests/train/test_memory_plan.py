"""The run's memory estimate: fed with the run's shape and the checkpointing the model was set to."""

from __future__ import annotations

import torch

from fasttune.config import RunConfig, apply_overrides
from fasttune.lora.apply import apply_lora
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM
from fasttune.models.memory import estimate_memory
from fasttune.train.memory_plan import lora_targets, run_estimate
from fasttune.train.metrics import summary_text


def lora_llama(targets):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64))
    apply_lora(model, r=4, lora_alpha=8, target_modules=list(targets))
    return model


def test_the_estimate_uses_the_runs_shape_and_the_models_checkpointing():
    model = lora_llama(["q_proj", "v_proj", "down_proj"])
    cfg = apply_overrides(RunConfig(), {"max_seq_length": 128, "per_device_train_batch_size": 3, "r": 4,
                                        "optim": "adamw_8bit"}, "test")
    assert lora_targets(model) == ["down_proj", "q_proj", "v_proj"]
    assert run_estimate(model, cfg, torch.device("cpu"), precision="fp32", quantization=None) is None
    for mode, keep in [("offload", 0), ("selective", 2), ("on", 0)]:
        model.set_gradient_checkpointing(mode, keep_layers=keep)
        got = run_estimate(model, cfg, torch.device("cuda"), precision="bf16", quantization="4bit")
        want = estimate_memory(model.config, batch=3, seq=128, quantization="4bit", r=4,
                               targets=["down_proj", "q_proj", "v_proj"], checkpointing=mode,
                               keep_layers=keep, optimizer="adamw_8bit", act_bytes=2, use_kernels=False)
        assert got == want, mode
    # the estimate changes with what it is told: more kept layers, more memory
    model.set_gradient_checkpointing("selective", keep_layers=4)
    more = run_estimate(model, cfg, torch.device("cuda"), precision="bf16", quantization="4bit")
    assert more.total > want.total


def test_the_summary_puts_the_estimate_next_to_the_measured_peak():
    result = {"steps": 2, "seconds": 1.0, "train_seconds": 1.0, "tokens": 10, "trained_tokens": 5,
              "tokens_per_s": 10.0,
              "first_loss": 2.0, "final_loss": 1.0, "memory_gib": 7.94, "memory_kind": "cuda_max_allocated"}
    assert "7.94 GiB (cuda_max_allocated)" in summary_text(result)
    result["memory_estimate_gib"] = 8.63
    assert "7.94 GiB (cuda_max_allocated; estimated 8.63)" in summary_text(result)
