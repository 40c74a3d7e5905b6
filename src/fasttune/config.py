"""The run configuration: typed dataclasses, YAML loading, validation and the CLI flags built from them.

Precedence is defaults < YAML < CLI flags. Field names follow the notebook vocabulary so that a user
can move between a notebook, a YAML file and the command line without renaming anything.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from fasttune.memory.settings import parse_host_gate_up

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_DATASET = "builtin:lumen"
AUTO = "auto"  # the value of a field that the run resolves from the model and the data (train/auto.py)


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names it."""


@dataclass
class ModelConfig:
    model_name: str = field(default=DEFAULT_MODEL, metadata={"help": (
        "Model to fine-tune: 'smollm2-135m' (embedded, no download), a Hugging Face hub id, "
        "a local directory with config.json + safetensors, or a .gguf file.")})
    max_seq_length: int | str = field(default=AUTO, metadata={"help": (
        "Longest training sequence in tokens, or auto: the longest training example rounded up to a "
        "multiple of 256, within the model's context and at most 4096 (the run log says what it chose).")})
    dtype: str = field(default="auto", metadata={"help": (
        "Weights and compute precision: auto (bf16 on GPUs that support it, fp16 on older GPUs, "
        "fp32 on CPU), fp32, bf16 or fp16.")})
    load_in_4bit: bool = field(default=False, metadata={"help": "Quantise the frozen base to NF4 (QLoRA; CUDA only)."})
    load_in_8bit: bool = field(default=False, metadata={"help": "Quantise the frozen base to 8-bit (CUDA only)."})
    load_in_fp8: bool = field(default=False, metadata={"help": (
        "Store the frozen base in FP8 (e4m3, a scale per row) and run its products (forward and input "
        "gradients) on FP8 tensor cores: faster, half the weight memory, FP8 numerics (GPUs of compute "
        "capability 8.9+, Llama family).")})
    cpu_fallback_16bit: bool = field(default=False, metadata={"help": (
        "On a machine without CUDA, load a 4/8-bit request in 16/32-bit instead of refusing.")})
    use_kernels: str = field(default="auto", metadata={"help": (
        "Triton fast path for the Llama family: auto (on where CUDA and Triton are present), on, off.")})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow code from the model repository to run."})
    token: str | None = field(default=None, metadata={"help": "Hugging Face token for gated models (or set HF_TOKEN)."})
    revision: str | None = field(default=None, metadata={"help": "Hub revision (branch, tag or commit)."})


@dataclass
class LoraConfig:
    r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int | str = field(default=AUTO, metadata={"help": (
        "LoRA scaling numerator (scale = alpha / r), or auto: 2 x r for models under 1B parameters, r from "
        "1B up.")})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA input path."})
    target_modules: list[str] = field(default_factory=lambda: ["default"], metadata={"help": (
        "Modules to adapt: 'default' (all seven projections of the Llama family, every linear "
        "layer otherwise), 'all-linear', or names such as q_proj v_proj.")})
    use_rslora: bool = field(default=False, metadata={"help": "Rank-stabilised scaling alpha / sqrt(r)."})
    random_state: int = field(default=3407, metadata={"help": "Seed for the LoRA initialisation."})
    bias: str = field(default="none", metadata={"help": "Only 'none' is supported: biases stay frozen."})
    use_dora: bool = field(default=False, metadata={"help": (
        "DoRA (weight-decomposed LoRA), through PEFT: architectures on the transformers + PEFT path only "
        "(fasttune's Llama-family model refuses it).")})
    modules_to_save: list[str] = field(default_factory=list, metadata={"help": (
        "Modules trained in full beside the adapters and saved with them (e.g. embeddings and head for new "
        "tokens), through PEFT: the transformers + PEFT path only.")})


# Canonical column names a dataset entry's `columns` may map to its own column names. The first five are
# the roles of the *_field options (a mapped column is renamed to the run's field of that role), the
# others the fixed column names of TRL's formats.
COLUMN_ROLES = ("instruction", "input", "output", "messages", "text", "prompt", "completion", "chosen",
                "rejected", "label", "tools")


@dataclass
class DatasetSpec:
    """One entry of a `dataset` list: where its rows are, its share of the mix and how to read them.

    `weight`: the entry's share of the training examples of each epoch (data/mixing.py); every entry
    gives one or none does. `format`: this entry's row format (default: the run's `format`). `columns`:
    canonical name -> this entry's column, e.g. {instruction: question, output: answer}. `name`,
    `data_files`, `split`, `streaming` go to `datasets.load_dataset` (a hub id, or a builder such as json
    with local data_files); `max_rows`: the first N valid rows of this entry (a streamed entry needs it).
    """

    path: str
    weight: float | None = None
    format: str | None = None
    columns: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    data_files: str | list[str] | dict[str, Any] | None = None
    split: str | None = None
    streaming: bool = False
    max_rows: int | None = None

    def __str__(self) -> str:
        return self.path

    @property
    def uses_loader(self) -> bool:
        """Read through `datasets.load_dataset` (a config name, data files or streaming asked for)."""
        return self.name is not None or self.data_files is not None or self.streaming


@dataclass
class DataConfig:
    dataset: str | list[DatasetSpec] = field(default=DEFAULT_DATASET, metadata={"help": (
        "Training data: 'builtin:lumen' (embedded), a .json/.jsonl/.csv/.parquet file, a directory "
        "saved with datasets.save_to_disk, or a hub dataset name (optionally name:split). Several: a list "
        "(on the command line several values), mixed; an entry is a path or a mapping with path and "
        "optional weight, format, columns, name, data_files, split, streaming, max_rows (on the command "
        "line as YAML, e.g. '{path: a.jsonl, weight: 0.7}'). See the README's Mixing datasets.")})
    eval_dataset: str | None = field(default="auto", metadata={"help": (
        "Held-out data in the same format: a file or directory, 'builtin:lumen' (its held-out split), "
        "'auto' (the built-in dataset's held-out split when training on one, else none), split:0.05 (that "
        "share of the training rows, held out) or none.")})
    val_set_size: float = field(default=0.0, metadata={"help": (
        "Hold this share of the training rows out as the eval set (the same rows in every run; "
        "eval_dataset split:0.05 says the same). 0: none.")})
    format: str = field(default="auto", metadata={"help": (
        "Row format: auto, alpaca, messages, text (plain text, every token trained), prompt_completion "
        "(TRL's prompt/completion rows).")})
    instruction_field: str = field(default="instruction", metadata={"help": "Alpaca instruction column."})
    input_field: str = field(default="input", metadata={"help": "Alpaca input column (may be absent)."})
    output_field: str = field(default="output", metadata={"help": "Alpaca output column."})
    messages_field: str = field(default="messages", metadata={"help": (
        "Chat column: OpenAI messages (role/content) or ShareGPT conversations (from/value).")})
    text_field: str = field(default="text", metadata={"help": "Text-format column (dataset_text_field)."})
    template: str = field(default="auto", metadata={"help": (
        "Prompt template for alpaca rows: auto (alpaca), alpaca, chat (the tokenizer's chat template); "
        "for the plain prompts of dpo/orpo/kto/grpo rows also text (the prompt text as it is, TRL's "
        "plain format).")})
    chat_template: str | None = field(default=None, metadata={"help": (
        "Chat template instead of the tokenizer's: a name (chatml, qwen-2.5, llama-3, llama-2, mistral, gemma, "
        "alpaca, vicuna, zephyr, phi-3; qwen-2.5 also renders tool-calling rows) or a .jinja file; "
        "rendered in Jinja's sandbox; alpaca rows are then rendered as chat too. none: the tokenizer's "
        "own.")})
    train_on_inputs: bool = field(default=False, metadata={"help": "Also train on prompt tokens, not only responses."})
    on_bad_row: str = field(default="error", metadata={"help": "A malformed row: error (stop, naming it) or skip (count it)."})
    on_long_row: str = field(default="truncate", metadata={"help": (
        "A row over max_seq_length: truncate, drop, or chunk (text rows for continued pretraining: "
        "consecutive pieces, every token trained once).")})
    packing: str = field(default="auto", metadata={"help": (
        "Pack several rows per sequence with attention kept inside each row: auto (on where exact), on, off.")})
    group_by_length: bool = field(default=False, metadata={"help": (
        "Batch rows of similar length together (as transformers' group_by_length: sorted within random "
        "mega-batches of 50 micro-batches), so padded batches carry little padding; the same rows per "
        "epoch.")})
    max_rows: int | None = field(default=None, metadata={"help": "Use only the first N rows (after validation)."})


@dataclass
class TrainConfig:
    output_dir: str = field(default="runs/default", metadata={"help": "Run directory for adapter, checkpoints and logs."})
    per_device_train_batch_size: int = field(default=2, metadata={"help": "Sequences per micro-batch."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimiser step."})
    max_steps: int = field(default=-1, metadata={"help": "Optimiser steps; -1 means use num_train_epochs."})
    num_train_epochs: float = field(default=2.0, metadata={"help": "Passes over the data when max_steps is -1."})
    learning_rate: float | str = field(default=AUTO, metadata={"help": (
        "Peak learning rate, or auto: scaled by the model's parameter count (5e-3 at 135M, 2e-4 at 8B, "
        "1e-4 from 33B, for the LoRA scale lora_alpha / r that is set; the run log says what it chose).")})
    warmup_steps: int = field(default=4, metadata={"help": "Linear warmup steps."})
    warmup_ratio: float = field(default=0.0, metadata={"help": "Warmup as a share of all steps (used if warmup_steps is 0)."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "linear, cosine or constant (each after warmup)."})
    optim: str = field(default="adamw_torch", metadata={"help": "adamw_torch, or adamw_8bit (bitsandbytes, CUDA only)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Decoupled weight decay."})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Clip the gradient norm to this; 0 disables clipping."})
    precision: str = field(default="auto", metadata={"help": "Compute precision: auto, fp32, bf16, fp16 (mixed)."})
    gradient_checkpointing: str = field(default="auto", metadata={"help": (
        "Activation memory: auto (off on a CPU; on a GPU offload for the Llama family, on for other "
        "models), off, on (recompute each layer), offload (layer inputs in pinned CPU memory, up to 40 "
        "percent of it; the inputs of the last layers past that stay on the GPU), selective (Llama family on "
        "a GPU: the last layers that fit in free GPU memory keep their activations, the others as offload; "
        "runs as off on a CPU).")})
    device_gate_up: int = field(default=1, metadata={"help": (
        "Llama family, offload/selective: the last N recomputed layers hold their MLP gate/up outputs on the "
        "GPU and skip recomputing them. The first costs no peak memory (its backward makes them right "
        "after the loss anyway); each further layer adds 2 x batch x max_seq_length x intermediate_size x "
        "2 bytes. 0: recompute them all.")})
    host_gate_up: str = field(default="auto", metadata={"help": (
        "Llama family, offload/selective: the share (0 to 1) of recomputed layers that send their MLP "
        "gate/up outputs to pinned host memory in the forward and skip recomputing them, as far as host "
        "memory allows (40 percent of it for all pinned activations). auto: with kept attention, what the "
        "host link carries beside the other copies, none at short rows (6 of 32 layers for Llama-3.1-8B "
        "at 1 x 32768). 0: none.")})
    keep_narrow: bool = field(default=True, metadata={"help": (
        "Llama family, offload/selective on a GPU: a micro-batch narrower than batch x max_seq_length "
        "(short rows, packing off) keeps the activations of as many of its last layers as fit in the "
        "activation memory a full micro-batch takes, so they are neither recomputed nor copied to the host; "
        "the peak stays within the printed estimate (that of a full micro-batch), but may pass that of the "
        "run's widest micro-batch when every row is shorter than max_seq_length. false: every micro-batch "
        "runs the full one's plan.")})
    logging_steps: int = field(default=4, metadata={"help": "Log a line every N steps."})
    save_steps: int = field(default=50, metadata={"help": "Checkpoint every N steps (0: only at the end)."})
    report_to: list[str] = field(default_factory=lambda: ["none"], metadata={"help": (
        "Also send metrics and the configuration to these trackers: tensorboard, wandb, mlflow, trackio "
        "(each through its own library, the pip extra of that name), or none.")})
    save_total_limit: int = field(default=2, metadata={"help": "Keep at most this many checkpoints (0: keep all)."})
    eval_steps: int = field(default=12, metadata={"help": "Evaluate every N steps when an eval set is given (0: at the end)."})
    eval_answers: int = field(default=16, metadata={"help": (
        "At each eval, greedily answer the first N held-out questions (alpaca or chat rows) and report the "
        "share that match the reference exactly and after normalisation; the final eval answers every "
        "question. 0: loss and perplexity only.")})
    seed: int = field(default=3407, metadata={"help": "Seed for data order, dropout and everything random."})
    resume: bool | str = field(default=False, metadata={"help": (
        "Continue a run: true or latest (the newest checkpoint in output_dir that reads back intact), or "
        "the path of one checkpoint directory (output_dir/checkpoints/step-N).")})
    max_nonfinite_steps: int = field(default=10, metadata={"help": (
        "A step whose loss or gradients are NaN/Inf is skipped (no update) and counted; this many in a row "
        "stop the run.")})
    auto_batch_size: bool = field(default=False, metadata={"help": (
        "Out of GPU memory, run each micro-batch as 2, 4, ... parts over the same rows (the global batch and "
        "the update stay the same) instead of stopping with advice.")})
    cuda_graph: str = field(default="auto", metadata={"help": (
        "auto: one process on a GPU, SFT on the Llama family without LoRA dropout: the forward and backward "
        "of micro-batches of up to 8,192 tokens are captured as CUDA graphs, one per shape (a padded batch "
        "runs as its real tokens in one packed row rounded up to 64 tokens, or padded into a captured row up "
        "to 1.25 times as wide), and replayed, sparing the host's time per kernel; each shape runs eagerly "
        "once first. off: every micro-batch runs eagerly.")})
    overwrite: bool = field(default=False, metadata={"help": (
        "Replace an earlier run in output_dir (its run.yaml, adapter, metrics, checkpoints); without it a "
        "fresh run into such a directory is an error.")})
    device: str = field(default="auto", metadata={"help": (
        "auto (CUDA, else Apple mps, else CPU), cpu, mps, cuda or cuda:N. Under torchrun each rank takes "
        "cuda:LOCAL_RANK (auto or cuda) or the CPU.")})
    distributed: str = field(default="auto", metadata={"help": (
        "Under torchrun: ddp (every rank holds the whole model; the LoRA gradients are all-reduced), fsdp "
        "(FSDP2: the frozen base and the adapters sharded over the ranks), or auto (ddp when the memory "
        "estimate of one step fits one GPU, else fsdp). One plain process ignores it.")})
    show_samples: int = field(default=3, metadata={"help": "Answer this many held-out questions before and after training."})
    report: bool = field(default=True, metadata={"help": "Write loss.png and print the summary at the end."})


@dataclass
class MethodConfig:
    """What is optimised: SFT, a preference loss, or GRPO. Names and defaults follow TRL's configs."""

    method: str = field(default="sft", metadata={"help": (
        "Training method: sft (next-token loss on responses), dpo (chosen/rejected pairs), orpo (pairs, "
        "no reference), kto (prompt/completion/label rows), grpo (prompts, sampled completions, reward "
        "functions).")})
    init_from: str | None = field(default=None, metadata={"help": (
        "A run directory (or its adapter/ directory) whose adapter this run continues: e.g. DPO after "
        "SFT. Its prompt contract is used, and its adapter, as it starts, is the reference of dpo, kto "
        "and grpo.")})
    beta: float | None = field(default=None, metadata={"help": (
        "dpo/kto: the KL strength (0.1); ipo: the regulariser tau (0.1); orpo: the odds-ratio weight lambda "
        "(0.1); grpo: the KL coefficient (0.0: no reference pass). Unset: TRL's default of the method.")})
    loss_type: str | None = field(default=None, metadata={"help": (
        "dpo: sigmoid (DPO, the default) or ipo (IPO); grpo: dapo (the default: the mean over every "
        "completion token of the step) or grpo (the mean over each completion, then over completions).")})
    desirable_weight: float = field(default=1.0, metadata={"help": "kto: weight of desirable rows."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "kto: weight of undesirable rows."})
    num_generations: int = field(default=8, metadata={"help": "grpo: completions sampled per prompt (G)."})
    max_completion_length: int = field(default=64, metadata={"help": "grpo: new tokens per completion."})
    temperature: float = field(default=1.0, metadata={"help": "grpo: sampling temperature."})
    top_p: float = field(default=1.0, metadata={"help": "grpo: nucleus sampling threshold."})
    epsilon: float = field(default=0.2, metadata={"help": "grpo: clipping range of the probability ratio."})
    num_iterations: int = field(default=1, metadata={"help": (
        "grpo: optimiser steps on each batch of sampled completions (1: the ratio is 1 and clipping is "
        "inactive; more: the clipped objective matters).")})
    reward: list[str] = field(default_factory=list, metadata={"help": (
        "grpo: reward functions, each module:function (a Python callable taking prompts, completions and "
        "the dataset's other columns as keyword lists, returning one float per completion) or a built-in: "
        "exact_match (the completion's answer equals the 'answer' column) or format (regex_format).")})
    reward_weights: list[float] | None = field(default=None, metadata={"help": (
        "grpo: one weight per reward function (default: all 1).")})


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    method: MethodConfig = field(default_factory=MethodConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the configuration as YAML. A token is never written, and trust_remote_code is written as
        false (only the current command line or Python call turns it on); a comment says either was used."""
        data = self.to_dict()
        data["data"]["dataset"] = dataset_record(self.data.dataset)
        notes = []
        if self.model.token:
            data["model"]["token"] = None
            notes.append("# a Hugging Face token was used (not saved: pass --token or set HF_TOKEN)")
        if self.model.trust_remote_code:
            data["model"]["trust_remote_code"] = False
            notes.append("# trust_remote_code was on (not saved: pass --trust_remote_code to turn it on)")
        Path(path).write_text("".join(n + "\n" for n in notes) + yaml.safe_dump(data, sort_keys=False))


SECTIONS: dict[str, type] = {"model": ModelConfig, "lora": LoraConfig, "data": DataConfig,
                             "train": TrainConfig, "method": MethodConfig}

CHOICES: dict[str, tuple[str, ...]] = {
    "dtype": ("auto", "fp32", "bf16", "fp16"),
    "use_kernels": ("auto", "on", "off"),
    "format": ("auto", "alpaca", "messages", "text", "prompt_completion"),
    "template": ("auto", "alpaca", "chat", "text"),
    "on_bad_row": ("error", "skip"),
    "on_long_row": ("truncate", "drop", "chunk"),
    "packing": ("auto", "on", "off"),
    "lr_scheduler_type": ("linear", "cosine", "constant"),
    "optim": ("adamw_torch", "adamw_8bit"),
    "precision": ("auto", "fp32", "bf16", "fp16"),
    "gradient_checkpointing": ("auto", "off", "on", "offload", "selective"),
    "distributed": ("auto", "ddp", "fsdp"),
    "cuda_graph": ("auto", "off"),
    "bias": ("none",),
    "method": ("sft", "dpo", "orpo", "kto", "grpo"),
    "loss_type": ("sigmoid", "ipo", "dapo", "grpo"),
}


# Values that were renamed: (option, old value) -> (new value, what to say). A config that writes the old
# value is an error saying what it is called now; only a stored run's run.yaml is read under the new name.
RENAMED: dict[tuple[str, str], tuple[str, str]] = {
    ("format", "completion"): ("text", "plain text rows are format 'text' now; TRL's prompt/completion rows "
                                       "are 'prompt_completion'"),
    ("template", "completion"): ("text", "the plain-text template is 'text' now (the prompt as it is "
                                         "written)"),
}

LOSS_TYPES = {("dpo", "sigmoid"), ("dpo", "ipo"), ("grpo", "dapo"), ("grpo", "grpo")}


def _field_type(cls: type, f: dataclasses.Field) -> Any:
    return typing.get_type_hints(cls)[f.name]


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML or CLI value to the field's type, or raise ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = next((a for a in args if a not in (type(None), str)), str)
        if str in args and inner is not str:  # a number or 'auto'
            if isinstance(value, str) and value.strip().lower() == AUTO:
                return AUTO
            try:
                return _coerce(value, inner, where)
            except ConfigError:
                kind = "an integer" if inner is int else "a number"
                raise ConfigError(f"{where}: expected {kind} or auto, got {value!r}") from None
        return _coerce(value, inner, where)
    if origin is list:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "0", "off"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int | str | float):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        except ValueError:
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
    if tp is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, str | int | float):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    return value


def resume_setting(value: Any, where: str = "resume") -> bool | str:
    """train.resume: True for true/latest, False for false/none, else the checkpoint directory named."""
    if isinstance(value, bool):
        return value
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: expected true, false, latest or a checkpoint directory, got {value!r}")
    word = value.strip().lower()
    if word in ("true", "yes", "1", "on", "latest"):
        return True
    if word in ("false", "no", "0", "off", "none", "null"):
        return False
    return value


def _set(section_obj: Any, name: str, value: Any, where: str) -> None:
    cls = type(section_obj)
    f = {f.name: f for f in fields(cls)}[name]
    if name == "resume":
        setattr(section_obj, name, resume_setting(value, where))
        return
    if name == "dataset":
        setattr(section_obj, name, dataset_setting(value, where))
        return
    value = _coerce(value, _field_type(cls, f), where)
    if isinstance(value, str) and (name, value) in RENAMED:
        raise ConfigError(f"{where}: {value!r}: {RENAMED[name, value][1]}")
    if name in CHOICES and value not in CHOICES[name] and not (value is None and f.default is None):
        raise ConfigError(f"{where}: {value!r} is not one of {', '.join(CHOICES[name])}")
    setattr(section_obj, name, value)


def dataset_setting(value: Any, where: str = "dataset") -> str | list[DatasetSpec]:
    """data.dataset: one path or hub name stays a string (as it always was); a list, or one mapping, becomes
    DatasetSpec entries. A command-line value that starts with '{' is a YAML mapping."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: expected a path, a list of entries or a mapping, got {value!r}")
    entries = []
    for i, item in enumerate(value, start=1):
        if isinstance(item, str) and item.lstrip().startswith("{"):
            try:
                item = yaml.load(item, Loader=_Yaml12Loader)
            except yaml.YAMLError as e:
                raise ConfigError(f"{where}[{i}]: not a valid YAML mapping: {e}") from None
        entries.append(_dataset_spec(item, f"{where}[{i}]"))
    if len(value) == 1 and isinstance(value[0], str) and not value[0].lstrip().startswith("{"):
        return entries[0].path  # one plain path: exactly the single-string setting
    weighted = [s.weight is not None for s in entries]
    if any(weighted) and not all(weighted):
        missing = weighted.index(False) + 1
        raise ConfigError(f"{where}[{missing}] ({entries[missing - 1].path}): no weight, while other entries "
                          "have one; give every entry a weight, or none (each row once per epoch)")
    return entries


def _dataset_spec(item: Any, where: str) -> DatasetSpec:
    """One dataset entry, checked: every key known, every value of its type."""
    if isinstance(item, str):
        item = {"path": item}
    if isinstance(item, DatasetSpec):  # built in Python: checked as its mapping would be
        item = dataset_record([item])[0]
    if not isinstance(item, dict):
        raise ConfigError(f"{where}: expected a path or a mapping, got {item!r}")
    known = [f.name for f in fields(DatasetSpec)]
    for key in item:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(known)})")
    path = item.get("path")
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{where}: 'path' must name a file, directory, hub dataset or builder, "
                          f"got {path!r}")
    where = f"{where} ({path})"
    spec = DatasetSpec(path=path)
    if isinstance(item.get("weight"), bool):
        raise ConfigError(f"{where}.weight: expected a number, got {item['weight']!r}")
    for key in ("weight", "format", "name", "split", "streaming", "max_rows"):
        if item.get(key) is not None:
            tp = _field_type(DatasetSpec, _spec_field(key))
            setattr(spec, key, _coerce(item[key], tp, f"{where}.{key}"))
    if spec.weight is not None and not (spec.weight > 0 and spec.weight < float("inf")):
        raise ConfigError(f"{where}.weight: must be a positive number, got {item['weight']!r} "
                          "(leave the entry out to train on none of it)")
    if spec.format is not None and ("format", spec.format) in RENAMED:
        raise ConfigError(f"{where}.format: {spec.format!r}: {RENAMED['format', spec.format][1]}")
    if spec.format is not None and spec.format not in CHOICES["format"]:
        raise ConfigError(f"{where}.format: {spec.format!r} is not one of {', '.join(CHOICES['format'])}")
    if spec.max_rows is not None and spec.max_rows <= 0:
        raise ConfigError(f"{where}.max_rows: must be positive, got {spec.max_rows}")
    columns = item.get("columns") or {}
    if not isinstance(columns, dict):
        raise ConfigError(f"{where}.columns: expected a mapping of column names, got {columns!r}")
    for role, column in columns.items():
        if role not in COLUMN_ROLES:
            raise ConfigError(f"{where}.columns: unknown column '{role}' (known: {', '.join(COLUMN_ROLES)})")
        if not isinstance(column, str) or not column:
            raise ConfigError(f"{where}.columns.{role}: expected the name of a column, got {column!r}")
    if len(set(columns.values())) != len(columns):
        raise ConfigError(f"{where}.columns: one column is named for two roles: {columns}")
    spec.columns = {str(k): str(v) for k, v in columns.items()}
    files = item.get("data_files")
    if files is not None and not _is_data_files(files):
        raise ConfigError(f"{where}.data_files: expected a path, a list of paths or a mapping of split to "
                          f"paths, got {files!r}")
    spec.data_files = files
    return spec


def _spec_field(name: str) -> dataclasses.Field:
    return {f.name: f for f in fields(DatasetSpec)}[name]


def _is_data_files(value: Any) -> bool:
    paths = lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(p, str) for p in v))
    return paths(value) or (isinstance(value, dict) and all(isinstance(k, str) and paths(v)
                                                            for k, v in value.items()))


def dataset_specs(data_cfg: Any) -> list[DatasetSpec]:
    """The entries of data.dataset: one string is one entry with every option at its default."""
    value = data_cfg.dataset
    return [DatasetSpec(path=value)] if isinstance(value, str) else list(value)


def dataset_record(value: str | list[DatasetSpec]) -> str | list[dict[str, Any]]:
    """data.dataset as run.yaml writes it: a string as it is; each entry with the keys it sets."""
    if isinstance(value, str):
        return value
    defaults = DatasetSpec(path="")
    return [{f.name: getattr(s, f.name) for f in fields(DatasetSpec)
             if f.name == "path" or getattr(s, f.name) != getattr(defaults, f.name)} for s in value]


def _section_of(key: str) -> str | None:
    for section, cls in SECTIONS.items():
        if key in {f.name for f in fields(cls)}:
            return section
    return None


def apply_overrides(cfg: RunConfig, values: dict[str, Any], source: str) -> RunConfig:
    """Apply `{section: {key: value}}` or flat `{key: value}` (names are unique across sections)."""
    for key, value in values.items():
        # `method` names both a section and its main field: a mapping is the section, a string the field
        if key in SECTIONS and (isinstance(value, dict) or _section_of(key) is None):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: section '{key}' must be a mapping")
            known = {f.name for f in fields(SECTIONS[key])}
            for sub, subval in value.items():
                if sub not in known:
                    raise ConfigError(f"{source}: unknown key '{key}.{sub}' (known: {', '.join(sorted(known))})")
                _set(getattr(cfg, key), sub, subval, f"{source}: {key}.{sub}")
        else:
            section = _section_of(key)
            if section is None:
                raise ConfigError(f"{source}: unknown key '{key}'")
            _set(getattr(cfg, section), key, value, f"{source}: {key}")
    validate(cfg)
    return cfg


class _Yaml12Loader(yaml.SafeLoader):
    """YAML with only true/false as booleans (YAML 1.2): `packing: off` stays the string 'off'."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _renamed_to_current(data: dict[str, Any]) -> dict[str, Any]:
    """A stored run.yaml's values under their current names (format/template 'completion' -> 'text'), and
    without `loss_type: sigmoid` where it was the former default written for every method (it applies to
    dpo only)."""
    def fix(values: dict[str, Any]) -> dict[str, Any]:
        return {k: RENAMED[k, v][0] if isinstance(v, str) and (k, v) in RENAMED else v
                for k, v in values.items()}

    out = {k: fix(v) if isinstance(v, dict) else v for k, v in fix(data).items()}
    method = out.get("method")
    if isinstance(method, dict) and method.get("loss_type") == "sigmoid" and method.get("method") != "dpo":
        out["method"] = {k: v for k, v in method.items() if k != "loss_type"}
    return out


def load_yaml(path: str | Path, cfg: RunConfig | None = None, *,
              allow_remote_code: bool = False, stored_run: bool = False) -> RunConfig:
    """A RunConfig from a YAML file over `cfg` (default: the defaults).

    trust_remote_code cannot be turned on from a file, only by the command line or the Python call of the
    current process: a file that sets it is an error unless `allow_remote_code` says the command line did.
    `stored_run`: the file is a finished run's run.yaml read back (by `fasttune eval`), so a value written
    before it was renamed is read under its new name; a config a user passes keeps the error.
    """
    path = Path(path)
    try:
        data = yaml.load(path.read_text(), Loader=_Yaml12Loader) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections or keys")
    if stored_run:
        data = _renamed_to_current(data)
    cfg = RunConfig() if cfg is None else cfg
    trusted = cfg.model.trust_remote_code or allow_remote_code
    loaded = apply_overrides(cfg, data, str(path))
    if loaded.model.trust_remote_code and not trusted:
        raise ConfigError(f"{path}: trust_remote_code: a file cannot turn it on (it runs Python code from "
                          "the model's folder); pass --trust_remote_code on the command line or set it in "
                          "Python")
    return loaded


def validate(cfg: RunConfig) -> None:
    t, lo, m, me = cfg.train, cfg.lora, cfg.model, cfg.method
    positive = lambda v: v == AUTO or v > 0
    checks = [
        (positive(m.max_seq_length), "max_seq_length must be positive or auto"),
        (positive(lo.lora_alpha), "lora_alpha must be positive or auto"),
        (lo.r > 0, "r must be positive"),
        (0.0 <= lo.lora_dropout < 1.0, "lora_dropout must be in [0, 1)"),
        (t.per_device_train_batch_size > 0, "per_device_train_batch_size must be positive"),
        (t.gradient_accumulation_steps > 0, "gradient_accumulation_steps must be positive"),
        (t.max_steps == -1 or t.max_steps > 0, "max_steps must be positive or -1"),
        (t.max_steps > 0 or t.num_train_epochs > 0, "num_train_epochs must be positive when max_steps is -1"),
        (positive(t.learning_rate), "learning_rate must be positive or auto"),
        (t.warmup_steps >= 0 and 0.0 <= t.warmup_ratio < 1.0, "warmup must be non-negative"),
        (t.logging_steps > 0, "logging_steps must be positive"),
        (t.save_steps >= 0 and t.eval_steps >= 0, "save_steps and eval_steps must be >= 0"),
        (t.eval_answers >= 0, "eval_answers must be >= 0"),
        (not (t.resume and t.overwrite), "resume and overwrite exclude each other"),
        (not isinstance(t.resume, str) or Path(t.resume).is_dir(),
         f"resume {t.resume}: no such checkpoint directory (true or latest: the newest in output_dir)"),
        (t.max_nonfinite_steps > 0, "max_nonfinite_steps must be positive"),
        (not t.auto_batch_size or me.method == "sft", "auto_batch_size applies to method sft only"),
        (t.device_gate_up >= 0, "device_gate_up must be >= 0"),
        (parse_host_gate_up(t.host_gate_up) is not None, "host_gate_up must be auto or a number in [0, 1]"),
        (m.load_in_4bit + m.load_in_8bit + m.load_in_fp8 <= 1,
         "load_in_4bit, load_in_8bit and load_in_fp8 exclude each other"),
        (me.beta is None or me.beta >= 0, "beta must be >= 0"),
        (me.loss_type is None or (me.method, me.loss_type) in LOSS_TYPES,
         f"loss_type {me.loss_type!r} does not apply to method {me.method!r} (dpo: sigmoid or ipo; grpo: "
         "dapo or grpo)"),
        (me.num_generations >= 2, "num_generations must be at least 2 (advantages compare a group)"),
        (me.max_completion_length > 0, "max_completion_length must be positive"),
        (me.temperature > 0 and 0 < me.top_p <= 1, "temperature must be > 0, top_p in (0, 1]"),
        (me.epsilon > 0 and me.num_iterations >= 1, "epsilon must be > 0, num_iterations >= 1"),
        (not me.reward or me.method == "grpo", "reward applies to method grpo only"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    from fasttune.data.holdout import holdout_fraction
    from fasttune.train.trackers import tracker_names

    # entries built in Python (DataConfig(dataset=[...])) are checked and normalised as YAML's are
    cfg.data.dataset = dataset_setting(cfg.data.dataset, "dataset")
    fraction = holdout_fraction(cfg.data)  # a malformed split:F or val_set_size is an error here
    _check_streaming(cfg.data, fraction)

    tracker_names(t.report_to)  # an unknown name is an error here, an absent library when the run starts
    _check_preset_name(m.model_name)


def _check_streaming(data: DataConfig, fraction: float | None) -> None:
    """A streamed entry is read as far as its first max_rows valid rows and no further, so what needs every
    row of it (a held-out share, ranked over all rows) is an error, and so is a stream with no max_rows."""
    for i, spec in enumerate(dataset_specs(data), start=1):
        if not spec.streaming:
            continue
        where = f"dataset[{i}] ({spec.path}).streaming"
        if spec.max_rows is None and data.max_rows is None:
            raise ConfigError(f"{where}: a streamed dataset is tokenized up to max_rows rows, held in memory "
                              "for exact epochs and resume; set max_rows (of the entry or of the run)")
        if fraction is not None:
            raise ConfigError(f"{where}: val_set_size / eval_dataset split:F hold out a share of every "
                              "row of the dataset, which a stream does not read; give eval_dataset a file")


def _check_preset_name(name: str) -> None:
    """A name one letter away from a preset is a typo, not a hub id to download."""
    import difflib

    from fasttune.models.presets import PRESETS

    if name in PRESETS or "/" in name or Path(name).expanduser().exists():
        return
    close = difflib.get_close_matches(name.lower(), list(PRESETS), n=1, cutoff=0.85)
    if close:
        raise ConfigError(f"model_name: {name!r} is not a preset; did you mean {close[0]!r}? (a hub id is "
                          "written org/name)")


# ---- the CLI flags, generated from the same fields ----------------------------------------------

def add_config_flags(parser: argparse.ArgumentParser, sections: tuple[str, ...] = tuple(SECTIONS)) -> None:
    """One `--name` flag per field; defaults shown in --help; values stay None unless given."""
    for section in sections:
        cls = SECTIONS[section]
        group = parser.add_argument_group(f"{section} options")
        defaults = cls()
        for f in fields(cls):
            tp = _field_type(cls, f)
            default = getattr(defaults, f.name)
            shown = " ".join(default) if isinstance(default, list) else default
            help_text = f"{f.metadata.get('help', '')} (default: {shown})"
            kwargs: dict[str, Any] = {"default": None, "help": help_text, "dest": f.name}
            if f.name == "dataset":  # one path (as ever), or several entries to mix
                kwargs["nargs"] = "+"
                kwargs["metavar"] = "PATH|{YAML}"
            elif tp is bool or f.name == "resume":
                kwargs["nargs"] = "?"
                kwargs["const"] = "true"
                kwargs["metavar"] = "latest|PATH" if f.name == "resume" else "BOOL"
            elif typing.get_origin(tp) is list:
                kwargs["nargs"] = "+"
                kwargs["metavar"] = "NAME"
            elif f.name in CHOICES and not any(key == f.name for key, _ in RENAMED):
                kwargs["choices"] = CHOICES[f.name]
            elif f.name in CHOICES:  # checked in _set, which names a renamed value's new name
                kwargs["metavar"] = "{" + ",".join(CHOICES[f.name]) + "}"
            else:
                kwargs["metavar"] = {int: "N", float: "X"}.get(tp, "VALUE")
            group.add_argument(f"--{f.name}", **kwargs)


def config_from_args(args: argparse.Namespace, sections: tuple[str, ...] = tuple(SECTIONS)) -> RunConfig:
    flag = getattr(args, "trust_remote_code", None)
    trusted = flag is not None and _coerce(flag, bool, "command line: trust_remote_code")
    cfg = load_yaml(args.config, allow_remote_code=trusted) if getattr(args, "config", None) else RunConfig()
    flags = {}
    for section in sections:
        for f in fields(SECTIONS[section]):
            value = getattr(args, f.name, None)
            if value is not None:
                flags[f.name] = value
    return apply_overrides(cfg, flags, "command line")
