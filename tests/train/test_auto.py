"""learning_rate, lora_alpha and max_seq_length 'auto': the values chosen for each model size and data, the
reasons logged, and the default embedded job keeping the values it was tuned with."""

from __future__ import annotations

import json

import pytest
import yaml

from fasttune import api
from fasttune.config import ConfigError, RunConfig, apply_overrides
from fasttune.train.auto import (
    AUTO_MAX_LEN,
    choose_learning_rate,
    choose_max_seq_length,
    context_length,
    parameter_count,
    step_size,
)


def test_the_embedded_model_gets_the_tuned_demo_values():
    choice = choose_learning_rate(134_515_008, r=16, lora_alpha="auto", learning_rate="auto")
    assert (choice.learning_rate, choice.lora_alpha) == (5e-3, 32)
    assert "135M parameters" in choice.reason and "lora_alpha 32" in choice.reason


@pytest.mark.parametrize("n_params,lr,alpha", [
    (8.03e9, 2e-4, 16),     # Llama-3.1-8B: the usual 7-8B LoRA/QLoRA setting, scale 1
    (70.6e9, 1e-4, 16),     # past the last anchor the step stays at 1e-4
    (1.24e9, 1.3e-3, 16),   # Llama-3.2-1B: between the anchors, on the log-log line
    (494e6, 1.5e-3, 32),    # Qwen2.5-0.5B: under 1B, scale 2
])
def test_larger_models_get_smaller_steps(n_params, lr, alpha):
    choice = choose_learning_rate(int(n_params), r=16, lora_alpha="auto", learning_rate="auto")
    assert (choice.learning_rate, choice.lora_alpha) == (lr, alpha)


def test_step_size_falls_monotonically_between_the_anchors():
    sizes = [1e8, 1.5e8, 3e8, 1e9, 3e9, 8e9, 1.5e10, 3.3e10, 1e11]
    steps = [step_size(n) for n in sizes]
    assert all(a >= b for a, b in zip(steps, steps[1:]))
    assert steps[1] == pytest.approx(1e-2) and steps[5] == pytest.approx(2e-4)
    assert steps[7] == pytest.approx(1e-4)


def test_a_set_alpha_is_kept_and_the_learning_rate_matches_its_scale():
    # alpha 32 at r 16 is scale 2: the 8B step of 2e-4 then needs learning_rate 1e-4
    choice = choose_learning_rate(8_030_000_000, r=16, lora_alpha=32, learning_rate="auto")
    assert (choice.learning_rate, choice.lora_alpha) == (1e-4, 32)
    assert "lora_alpha" not in choice.reason.split("(")[0].replace("learning_rate", "")
    # a set learning rate is kept; alpha still follows the size
    choice = choose_learning_rate(8_030_000_000, r=8, lora_alpha="auto", learning_rate=3e-4)
    assert (choice.learning_rate, choice.lora_alpha) == (3e-4, 8)


def test_rslora_scale_counts_the_square_root_of_r():
    choice = choose_learning_rate(134_515_008, r=16, lora_alpha="auto", learning_rate="auto", use_rslora=True)
    assert choice.lora_alpha == 8 and choice.learning_rate == 5e-3  # 8 / sqrt(16) = 2


@pytest.mark.parametrize("longest,context,chosen", [
    (156, 8192, 256),              # the embedded dataset's longest example
    (257, 8192, 512),
    (4096, 131072, AUTO_MAX_LEN),  # rows cut at the cap: auto stops there
    (1024, 1024, 1024),            # GPT-2's context
    (200, 128, 128),               # never past the model's context
    (900, None, 1024),
])
def test_max_seq_length_covers_the_longest_example(longest, context, chosen):
    choice = choose_max_seq_length(longest, context)
    assert choice.max_seq_length == chosen
    assert f"max_seq_length {chosen}" in choice.reason and f"{longest} tokens" in choice.reason


def test_parameter_count_and_context_match_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    llama = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    gpt2 = GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=1024)
    for config, cls, ctx in ((llama, LlamaForCausalLM, 512), (gpt2, GPT2LMHeadModel, 1024)):
        assert parameter_count(config) == sum(p.numel() for p in cls(config).parameters())
        assert context_length(config) == ctx


@pytest.mark.parametrize("key,value,match", [
    ("learning_rate", "fast", r"learning_rate: expected a number or auto, got 'fast'"),
    ("max_seq_length", "long", r"max_seq_length: expected an integer or auto, got 'long'"),
    ("lora_alpha", "-2", r"lora_alpha must be positive or auto"),
    ("learning_rate", 0, r"learning_rate must be positive or auto"),
])
def test_bad_values_name_the_field(key, value, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(RunConfig(), {key: value}, "test")


def test_auto_is_the_default_and_any_case_reads_as_auto():
    cfg = RunConfig()
    assert (cfg.train.learning_rate, cfg.lora.lora_alpha, cfg.model.max_seq_length) == ("auto",) * 3
    cfg = apply_overrides(RunConfig(), {"learning_rate": "AUTO", "max_seq_length": "512"}, "test")
    assert cfg.train.learning_rate == "auto" and cfg.model.max_seq_length == 512


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A tiny random Llama over SmolLM2's tokenizer with a 128-token context."""
    from tiny_run import write_tiny_llama

    return write_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), context=128)


def test_a_run_logs_what_auto_chose_and_saves_the_numbers(tmp_path, tiny_llama):
    rows = [{"instruction": f"Say the word number {i}.", "output": "word " * (3 + 40 * (i == 2))}
            for i in range(6)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    values = dict(model_name=str(tiny_llama), dataset=str(data), eval_dataset="none", max_steps=1, r=4,
                  show_samples=0, output_dir=str(tmp_path / "run"), report=False)
    cfg = apply_overrides(RunConfig(), values, "test")
    lines: list[str] = []
    api.train(cfg, log=lines.append)
    said = "\n".join(lines)
    assert "auto: learning_rate 0.005 (a step of learning_rate x scale = 0.01" in said
    assert "lora_alpha 8 (scale 2: 2 x r below 1B parameters)" in said
    assert "auto: max_seq_length 128 (the longest training example has" in said
    assert "the model's context is 128" in said
    assert "LoRA r=4 alpha=8" in said
    saved = yaml.safe_load((tmp_path / "run" / "run.yaml").read_text())
    assert saved["train"]["learning_rate"] == 5e-3 and saved["lora"]["lora_alpha"] == 8
    assert saved["model"]["max_seq_length"] == 128


@pytest.mark.slow
def test_the_default_job_resolves_to_the_values_it_was_tuned_with():
    """The embedded job (SmolLM2-135M on builtin:lumen) keeps learning_rate 5e-3, lora_alpha 32 and
    max_seq_length 256, the values its learning was checked with."""
    cfg, lines = RunConfig(), []
    tokenizer = api.load_tokenizer(cfg.model)
    cfg = api.resolve_learning_rate(cfg, lines.append)
    max_len, _ = api.tokenize_train(cfg, tokenizer, lines.append)
    assert (cfg.train.learning_rate, cfg.lora.lora_alpha, max_len) == (5e-3, 32, 256)


def test_auto_learning_rate_is_refused_for_preference_methods():
    cfg = apply_overrides(RunConfig(), {"method": "dpo"}, "test")
    with pytest.raises(ConfigError, match="learning_rate: 'auto' is chosen for supervised fine-tuning.*dpo"):
        api.resolve_learning_rate(cfg, lambda line: None)
