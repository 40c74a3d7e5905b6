"""The run configuration: YAML, flags, precedence, and errors that name what is wrong."""

from __future__ import annotations

import argparse

import pytest

from fasttune.config import (
    ConfigError,
    RunConfig,
    add_config_flags,
    apply_overrides,
    config_from_args,
    load_yaml,
)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    add_config_flags(parser)
    return parser.parse_args(argv)


def test_defaults_are_the_embedded_job():
    cfg = RunConfig()
    assert cfg.model.model_name == "smollm2-135m" and cfg.data.dataset == "builtin:lumen"


def test_unknown_key_names_the_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rat: 0.001\n")
    with pytest.raises(ConfigError, match=r"unknown key 'train\.learning_rat'"):
        load_yaml(path)
    path.write_text("lora_rank: 8\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: unknown key 'lora_rank'"):
        load_yaml(path)
    path.write_text("optimizer:\n  lr: 1\n")
    with pytest.raises(ConfigError, match="unknown key 'optimizer'"):
        load_yaml(path)


@pytest.mark.parametrize("yaml_text,match", [
    ("lora:\n  r: sixteen\n", r"lora\.r: expected an integer, got 'sixteen'"),
    ("learning_rate: fast\n", r"learning_rate: expected a number"),
    ("max_steps: 2.5\n", r"max_steps: expected an integer"),
    ("load_in_4bit: maybe\n", r"load_in_4bit: expected true or false"),
    ("optim: sgd\n", r"optim: 'sgd' is not one of adamw_torch, adamw_8bit"),
    ("train: 3\n", r"section 'train' must be a mapping"),
    ("lora:\n  r: 0\n", r"r must be positive"),
    ("device_gate_up: -1\n", r"device_gate_up must be >= 0"),
    ("host_gate_up: 1.5\n", r"host_gate_up must be auto or a number in \[0, 1\]"),
    ("host_gate_up: some\n", r"host_gate_up must be auto or a number in \[0, 1\]"),
    ("- a\n- b\n", r"top level must be a mapping"),
    ("r: [1, 2\n", r"not valid YAML"),
])
def test_bad_values(tmp_path, yaml_text, match):
    path = tmp_path / "run.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_yaml(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_yaml(tmp_path / "nope.yaml")


def test_yaml_types_are_coerced(tmp_path):
    path = tmp_path / "run.yaml"
    # YAML 1.1 reads 2e-4 (no dot) as a string; it must still be a number here
    path.write_text("learning_rate: 2e-4\ntarget_modules: q_proj, v_proj\nmax_rows: null\nr: 8\n")
    cfg = load_yaml(path)
    assert cfg.train.learning_rate == 2e-4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.r == 8 and cfg.data.max_rows is None


def test_precedence_defaults_yaml_flags(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  learning_rate: 0.001\n  max_steps: 50\nlora:\n  r: 8\n")
    cfg = config_from_args(parse(["--config", str(path), "--max_steps", "7", "--lora_alpha", "32"]))
    assert cfg.train.max_steps == 7          # flag beats YAML
    assert cfg.train.learning_rate == 0.001  # YAML beats default
    assert cfg.lora.r == 8
    assert cfg.lora.lora_alpha == 32         # flag beats default
    assert cfg.train.per_device_train_batch_size == RunConfig().train.per_device_train_batch_size


def test_flags_types_and_bools():
    cfg = config_from_args(parse(["--resume", "--train_on_inputs", "false", "--target_modules", "q_proj",
                                  "k_proj", "--warmup_ratio", "0.1"]))
    assert cfg.train.resume is True and cfg.data.train_on_inputs is False
    assert cfg.lora.target_modules == ["q_proj", "k_proj"] and cfg.train.warmup_ratio == 0.1
    with pytest.raises(ConfigError, match=r"command line: per_device_train_batch_size: expected an integer"):
        config_from_args(parse(["--per_device_train_batch_size", "two"]))


def test_saved_config_reloads_identically(tmp_path):
    cfg = apply_overrides(RunConfig(), {"r": 4, "learning_rate": 1e-3, "target_modules": ["q_proj"],
                                        "eval_dataset": "x.jsonl"}, "test")
    cfg.save(tmp_path / "run.yaml")
    assert load_yaml(tmp_path / "run.yaml").to_dict() == cfg.to_dict()


@pytest.mark.parametrize("yaml_text,match", [
    ("format: completion\n", r"format: 'completion': plain text rows are format 'text' now; TRL's "
                             r"prompt/completion rows are 'prompt_completion'"),
    ("data:\n  template: completion\n",
     r"data\.template: 'completion': the plain-text template is 'text' now"),
])
def test_the_old_completion_name_is_an_error_naming_the_new_one(tmp_path, yaml_text, match):
    path = tmp_path / "job.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_yaml(path)
    with pytest.raises(ConfigError, match=r"command line: format: 'completion': .* format 'text' now"):
        config_from_args(parse(["--format", "completion"]))
    assert config_from_args(parse(["--format", "text", "--template", "text"])).data.format == "text"


def test_a_stored_run_yaml_reads_the_old_name_as_text(tmp_path):
    """`fasttune eval --run` reads back a finished run's run.yaml, which may predate the rename."""
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  format: completion\n  template: completion\n  dataset: d.jsonl\n")
    data = load_yaml(path, stored_run=True).data
    assert (data.format, data.template, data.dataset) == ("text", "text", "d.jsonl")
    path.write_text("format: completion\n")
    assert load_yaml(path, stored_run=True).data.format == "text"


@pytest.mark.parametrize("method,kept", [("sft", None), ("grpo", None), ("dpo", "sigmoid")])
def test_a_stored_run_yaml_with_the_former_default_loss_type_loads(tmp_path, method, kept):
    """run.yaml files once recorded `loss_type: sigmoid` for every method; it applies to dpo only."""
    path = tmp_path / "run.yaml"
    path.write_text(f"method:\n  method: {method}\n  loss_type: sigmoid\n")
    assert load_yaml(path, stored_run=True).method.loss_type == kept
    if method != "dpo":  # a config a user passes keeps the error
        with pytest.raises(ConfigError, match="loss_type 'sigmoid' does not apply"):
            load_yaml(path)
