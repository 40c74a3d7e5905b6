"""DPOTrainer, ORPOTrainer, KTOTrainer and GRPOTrainer with TRL's configs: the same run as `fasttune train
--method ...` (losses, metrics and adapters), TRL's config fields each read, refused or warned about by
name, and errors that name the field or row."""

from __future__ import annotations

import dataclasses
import json
import math
import runpy
from pathlib import Path

import pytest
import torch
from notebook_port import ported

from fasttune import api
from fasttune.config import RunConfig, apply_overrides
from fasttune.data.errors import DataError
from fasttune.notebook import (
    DPOConfig,
    DPOTrainer,
    FastLanguageModel,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    ORPOConfig,
    ORPOTrainer,
    TrainingArguments,
)
from fasttune.notebook.method_args import TABLES
from fasttune.train.metrics import read_metrics

datasets = pytest.importorskip("datasets")

PAIRS = [
    {"prompt": "Who invented the tide-harp?", "chosen": "Idra Vaskelund.", "rejected": "Tomas Brindle."},
    {"prompt": "How many strings?", "chosen": "Nineteen.", "rejected": "Twelve."},
    {"prompt": "What is the reference pitch?", "chosen": "A = 436 Hz.", "rejected": "A = 440 Hz."},
    {"prompt": "Which string is tuned first?", "chosen": "The Keel string.", "rejected": "The Crown."},
]
SUMS = [{"prompt": f"What is {a} + {b}?", "answer": str(a + b)} for a, b in [(1, 2), (3, 4), (2, 2), (5, 1)]]
# the settings both sides of a comparison share: (notebook field, CLI option, value)
SHARED = {
    "per_device_train_batch_size": 2,
    "max_steps": 3,
    "learning_rate": 1e-2,
    "warmup_steps": 0,
    "logging_steps": 1,
    "seed": 3407,
}


def _model(model_dir):
    model, _ = FastLanguageModel.from_pretrained(
        model_name=str(model_dir), max_seq_length=128, dtype=torch.float32
    )
    return FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=3407)


def _cli(tmp_path, model_dir, data, **values):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    values = {
        "model_name": str(model_dir),
        "dataset": str(path),
        "eval_dataset": "none",
        "template": "text",
        "r": 4,
        "lora_alpha": 8,
        "output_dir": str(tmp_path / "cli"),
        "show_samples": 0,
        "report": False,
        **SHARED,
        **values,
    }
    return apply_overrides(RunConfig(), values, "test")


def _train_records(path):
    return [r for r in read_metrics(path / "metrics.jsonl") if r["kind"] == "train"]


def _same_adapters(notebook_model, cli_model):
    ours = {n: p for n, p in notebook_model.model.named_parameters() if p.requires_grad}
    theirs = {n: p for n, p in cli_model.named_parameters() if p.requires_grad}
    assert ours.keys() == theirs.keys() and ours
    for name in ours:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-5, atol=1e-6)


def test_dpo_trainer_runs_the_cli_dpo_run(model_dir, tmp_path):
    model = _model(model_dir)
    args = DPOConfig(output_dir=str(tmp_path / "nb"), max_length=64, beta=0.1, report_to="none", **SHARED)
    trainer = DPOTrainer(
        model=model,
        ref_model=None,
        args=args,
        train_dataset=datasets.Dataset.from_list(PAIRS),
        processing_class=model.tokenizer,
    )
    out = trainer.train()
    cli = api.train(
        _cli(tmp_path, model_dir, PAIRS, method="dpo", beta=0.1, max_seq_length=64), log=lambda s: None
    )

    records = _train_records(tmp_path / "cli")
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == len(records) == 3 and out.global_step == 3
    for h, r in zip(history, records):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
            assert h[key] == pytest.approx(r[key], rel=1e-5, abs=1e-6), key
    assert history[0]["loss"] == pytest.approx(0.6931472, abs=1e-6)  # the reference is the adapter off
    assert history[-1]["rewards/margins"] != 0.0
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies"):
        assert out.metrics[key] == history[-1][key]
    assert out.training_loss == pytest.approx(sum(h["loss"] for h in history) / 3)
    _same_adapters(model, cli.model)


def test_each_epoch_ends_on_its_own_window_as_in_trls_dpo_trainer(model_dir, tmp_path):
    """5 pairs at batch 1 x accumulation 2 over 2 epochs: TRL's DPOTrainer (transformers' Trainer) takes 3
    steps an epoch, the third of one pair, 6 in all; the notebook's DPOTrainer the same, no window reaching
    into the next epoch, and save_strategy 'epoch' saves where TRL's does."""
    import transformers

    trl = pytest.importorskip("trl")
    pairs = PAIRS + [{"prompt": "Where is it played?", "chosen": "In Norhaven.", "rejected": "In Rome."}]
    kw = {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 2, "num_train_epochs": 2,
          "max_length": 64, "beta": 0.1, "logging_steps": 1, "report_to": "none", "save_strategy": "epoch"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    ref = trl.DPOTrainer(model=hf, args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, **kw),
                         train_dataset=datasets.Dataset.from_list(pairs), processing_class=tok)
    assert ref.train().global_step == 6
    saved = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "trl").glob("checkpoint-*"))
    assert saved == [3, 6]

    model = _model(model_dir)
    trainer = DPOTrainer(model=model, ref_model=None, args=DPOConfig(output_dir=str(tmp_path / "nb"), **kw),
                         train_dataset=datasets.Dataset.from_list(pairs), processing_class=model.tokenizer)
    out = trainer.train()
    assert out.global_step == 6 and out.metrics["epoch"] == 2.0
    seen = [r["trained_tokens"] for r in _train_records(tmp_path / "nb")]  # pairs trained so far
    assert [b - a for a, b in zip([0] + seen, seen)] == [2, 2, 1, 2, 2, 1]
    ours = sorted(p.name for p in (tmp_path / "nb" / "checkpoints").glob("step-*"))
    assert ours == [f"step-{n}" for n in saved]


def length_reward(completions, answer, **_):
    """A fixed function of the completion text: rewards differ within a group."""
    return [len(c) / 10 + (c.strip() == a) for c, a in zip(completions, answer)]


def test_grpo_trainer_runs_the_cli_grpo_run(model_dir, tmp_path):
    model = _model(model_dir)
    shared = dict(SHARED, per_device_train_batch_size=4, max_steps=2)
    args = GRPOConfig(
        output_dir=str(tmp_path / "nb"),
        num_generations=2,
        max_completion_length=4,
        beta=0.04,
        report_to="none",
        **shared,
    )
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=args,
        train_dataset=SUMS,
        processing_class=model.tokenizer,
    )
    out = trainer.train()
    cfg = _cli(
        tmp_path,
        model_dir,
        SUMS,
        method="grpo",
        num_generations=2,
        max_completion_length=4,
        beta=0.04,
        max_seq_length=trainer._max_seq_length(),
        **shared,
    )
    cli = api.train(cfg, log=lambda s: None, reward_funcs=[length_reward])

    records = _train_records(tmp_path / "cli")
    history = [h for h in trainer.state.log_history if "loss" in h]
    assert len(history) == len(records) == 2
    for h, r in zip(history, records):
        for key in (
            "loss",
            "reward",
            "reward_std",
            "rewards/length_reward/mean",
            "rewards/length_reward/std",
            "completions/mean_length",
            "kl",
        ):
            assert h[key] == pytest.approx(r[key], rel=1e-5, abs=1e-6), key
    assert history[0]["reward_std"] > 0 and history[-1]["kl"] > 0
    assert {
        "rewards/length_reward/mean",
        "rewards/length_reward/std",
        "completions/mean_length",
        "kl",
    } <= set(out.metrics)
    _same_adapters(model, cli.model)


@pytest.mark.parametrize("method", ["orpo", "kto"])
def test_orpo_and_kto_trainers_train_and_report_rewards(model_dir, tmp_path, method):
    model = _model(model_dir)
    if method == "orpo":
        trainer = ORPOTrainer(
            model=model,
            args=ORPOConfig(
                output_dir=str(tmp_path),
                max_steps=2,
                logging_steps=1,
                per_device_train_batch_size=2,
                report_to="none",
            ),
            train_dataset=PAIRS,
            processing_class=model.tokenizer,
        )
    else:
        rows = [
            {"prompt": p["prompt"], "completion": p["chosen" if k % 2 else "rejected"], "label": bool(k % 2)}
            for k, p in enumerate(PAIRS)
        ]
        trainer = KTOTrainer(
            model=model,
            args=KTOConfig(
                output_dir=str(tmp_path),
                max_steps=2,
                logging_steps=1,
                per_device_train_batch_size=2,
                report_to="none",
            ),
            train_dataset=rows,
            processing_class=model.tokenizer,
        )
        assert trainer.options.shuffle is False  # KTOConfig draws rows in dataset order (TRL's 'sequential')
    out = trainer.train()
    assert out.global_step == 2
    # as TRL logs them: KTO has no pairs to count accuracies over, and its KL reference point instead
    extra = {"rewards/accuracies", "nll_loss"} if method == "orpo" else {"kl"}
    assert {"rewards/chosen", "rewards/rejected", "rewards/margins"} | extra <= set(out.metrics)


def test_cut_prompts_and_completions_as_trl_before_1_0(model_dir):
    model = _model(model_dir)
    long = [
        {
            "prompt": "one two three four five six seven eight nine ten",
            "chosen": " yes indeed it is so",
            "rejected": " no",
        }
    ]
    full = DPOTrainer(model=model, args=DPOConfig(output_dir="x"), train_dataset=long).train_dataset.examples[
        0
    ]
    cut = DPOTrainer(
        model=model,
        args=DPOConfig(output_dir="x", max_prompt_length=3, max_completion_length=2),
        train_dataset=long,
    ).train_dataset.examples[0]
    start = next(i for i, t in enumerate(full.chosen.labels) if t != -100)
    assert cut.chosen.input_ids == full.chosen.input_ids[start - 3 : start + 2]
    assert cut.chosen.labels[:3] == [-100] * 3 and -100 not in cut.chosen.labels[3:]
    grpo = GRPOTrainer(
        model=model,
        reward_funcs=length_reward,
        train_dataset=SUMS[:1],
        args=GRPOConfig(output_dir="x", max_prompt_length=2, num_generations=2),
    )
    assert len(grpo.train_dataset.examples[0].prompt_ids) == 2


def test_bad_arguments_name_the_field(model_dir, tmp_path):
    with pytest.raises(TypeError, match="DPOConfig: unknown field 'num_generations'"):
        DPOConfig(num_generations=4)
    model = _model(model_dir)

    def dpo(**fields):
        return DPOTrainer(
            model=model, args=DPOConfig(output_dir=str(tmp_path), **fields), train_dataset=PAIRS
        )

    with pytest.raises(ValueError, match=r"DPOConfig\.label_smoothing=0\.1 is not supported"):
        dpo(label_smoothing=0.1)
    with pytest.raises(
        ValueError, match=r"DPOConfig\.loss_type='hinge' is not supported .*'sigmoid' or 'ipo'"
    ):
        dpo(loss_type="hinge")
    with pytest.raises(ValueError, match=r"DPOConfig\.loss_type=\['sigmoid', 'ipo'\] is not supported"):
        dpo(loss_type=["sigmoid", "ipo"])
    with pytest.raises(ValueError, match=r"DPOConfig\.truncation_mode='keep_end'"):
        dpo(truncation_mode="keep_end")
    with pytest.raises(ValueError, match=r"DPOConfig\.sync_ref_model=True"):
        dpo(sync_ref_model=True)
    with pytest.raises(ValueError, match="ref_model is not supported"):
        DPOTrainer(model=model, ref_model=model, args=DPOConfig(output_dir="x"), train_dataset=PAIRS)
    with pytest.raises(DataError, match="train_dataset, row 2, field 'rejected': missing"):
        DPOTrainer(
            model=model,
            args=DPOConfig(output_dir="x"),
            train_dataset=[PAIRS[0], {"prompt": "q", "chosen": "a"}],
        )
    with pytest.raises(DataError, match="train_dataset, row 1, field 'label'"):
        KTOTrainer(
            model=model, args=KTOConfig(output_dir="x"), train_dataset=[{"prompt": "q", "completion": "a"}]
        )

    def grpo(funcs=length_reward, **fields):
        return GRPOTrainer(
            model=model, reward_funcs=funcs, args=GRPOConfig(output_dir="x", **fields), train_dataset=SUMS
        )

    for name, value in [
        ("top_k", 50),
        ("scale_rewards", "batch"),
        ("mask_truncated_completions", True),
        ("epsilon_high", 0.28),
        ("steps_per_generation", 4),
        ("generation_kwargs", {"a": 1}),
    ]:
        with pytest.raises(ValueError, match=rf"GRPOConfig\.{name}="):
            grpo(**{name: value})
    with pytest.raises(ValueError, match=r"reward_funcs\[0\]='org/reward-model' is not supported"):
        grpo("org/reward-model")
    with pytest.raises(ValueError, match="reward_weights: 2 weights for 1 reward functions"):
        grpo(reward_weights=[1.0, 2.0])
    with pytest.raises(
        ValueError, match="per_device_train_batch_size: 3 is not a multiple of num_generations 2"
    ):
        grpo(per_device_train_batch_size=3, num_generations=2, max_steps=1).train()
    with pytest.warns(UserWarning, match="DPOConfig: fasttune ignores precompute_ref_log_probs"):
        dpo(precompute_ref_log_probs=True, max_steps=1, per_device_train_batch_size=4).train()


def test_a_failing_reward_function_names_itself_and_the_row(model_dir, tmp_path):
    def picky(completions, answer, **_):
        return [1.0 / (a != "7") for a in answer]

    model = _model(model_dir)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[picky],
        train_dataset=SUMS,
        args=GRPOConfig(
            output_dir=str(tmp_path),
            num_generations=2,
            per_device_train_batch_size=8,
            max_completion_length=2,
            max_steps=1,
            report_to="none",
        ),
    )
    with pytest.raises(ValueError, match="reward function 'picky' raised ZeroDivisionError on row 2: "):
        trainer.train()


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto", "grpo"])
def test_every_field_of_trls_config_is_read_refused_or_warned_about(method):
    trl = pytest.importorskip("trl")
    if method == "dpo":
        config = trl.DPOConfig
    elif method == "grpo":
        config = trl.GRPOConfig
    else:
        experimental = pytest.importorskip(f"trl.experimental.{method}")
        config = getattr(experimental, f"{method.upper()}Config")
    table = TABLES[method]
    unknown = [f.name for f in dataclasses.fields(config) if not table.knows(f.name)]
    assert not unknown, f"{config.__name__} fields fasttune does not classify: {unknown}"
    ours = {"dpo": DPOConfig, "orpo": ORPOConfig, "kto": KTOConfig, "grpo": GRPOConfig}[method]
    theirs = {f.name: f for f in dataclasses.fields(config)}
    # the fields the method's config defines or sets apart from TrainingArguments have TRL's defaults
    base = {f.name for f in dataclasses.fields(TrainingArguments)}
    own = [
        f
        for f in dataclasses.fields(ours)
        if f.name not in base
        or f.name
        in ("learning_rate", "logging_steps", "gradient_checkpointing", "bf16", "train_sampling_strategy")
    ]
    for f in own:
        if f.name in theirs and theirs[f.name].default is not dataclasses.MISSING:
            assert f.default == theirs[f.name].default, f.name


NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "trl_dpo_grpo.py"
IMPORTS = {
    "from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer": (
        "from fasttune import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer"
    ),
    "from unsloth import FastLanguageModel": "from fasttune import FastLanguageModel",
}


def test_a_trl_notebook_runs_with_only_its_imports_changed(model_dir, tmp_path):
    script = ported(NOTEBOOK, IMPORTS, tmp_path)
    with pytest.warns(UserWarning) as caught:
        ns = runpy.run_path(
            str(script),
            init_globals=dict(
                MODEL_NAME=str(model_dir), OUTPUT_DIR=str(tmp_path), MAX_SEQ_LENGTH=128, MAX_STEPS=2
            ),
        )
    warned = " ".join(str(w.message) for w in caught)
    if not torch.cuda.is_available():  # the notebook's 4-bit and 8-bit Adam: named, then replaced
        assert "load_in_4bit" in warned and "adamw_8bit" in warned
    dpo, grpo = ns["dpo_stats"], ns["grpo_stats"]
    assert dpo.global_step == 2 and math.isfinite(dpo.training_loss) and "rewards/margins" in dpo.metrics
    assert grpo.global_step == 2 and math.isfinite(grpo.training_loss)
    for name in ("int_reward_func", "correctness_reward_func"):
        assert f"rewards/{name}/mean" in grpo.metrics and f"rewards/{name}/std" in grpo.metrics
    assert (tmp_path / "lora_model" / "adapter_model.safetensors").is_file()


def test_method_trainers_plan_the_activation_memory_of_their_run(model_dir, tmp_path, monkeypatch):
    """train() hands the run's shape to the offload planner that SFTTrainer and `fasttune train` use (it acts
    on a GPU only: `tests/memory/test_setup.py`)."""
    from fasttune.notebook import method_trainer

    seen = []
    monkeypatch.setattr(method_trainer, "plan_activation_memory",
                        lambda model, run, precision, log: seen.append(
                            (model, run.model.max_seq_length, run.train.per_device_train_batch_size)))
    model = _model(model_dir)
    args = DPOConfig(output_dir=str(tmp_path), max_length=64, report_to="none", **{**SHARED, "max_steps": 1})
    rows = datasets.Dataset.from_list(PAIRS)
    trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=rows,
                         processing_class=model.tokenizer)
    trainer.train()
    assert seen == [(model, trainer._max_seq_length(), 2)]
