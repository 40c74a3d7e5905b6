"""`TrainingArguments` / `SFTConfig` with the field names and defaults of transformers and TRL, and their
mapping onto fasttune's `TrainConfig`.

`args` may be this module's classes or the real `transformers.TrainingArguments` (or TRL's `SFTConfig`):
the mapping reads fields by name. Every field fasttune cannot honour is named: an error where ignoring it
would change what is trained (deepspeed, fsdp_config, push_to_hub, label smoothing, ...), a warning where it
only changes logging or speed.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import warnings
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from fasttune.config import TrainConfig

# Fields that change the training result or need infrastructure fasttune does not drive.
UNSUPPORTED: dict[str, str] = {
    "deepspeed": ("DeepSpeed is not used; run the script under torchrun and fasttune trains with DDP, or "
                  "with FSDP2 given fsdp='full_shard'"),
    "fsdp_config": "fasttune's FSDP2 takes no configuration: set fsdp='full_shard' and launch with torchrun",
    "push_to_hub": "upload the saved adapter yourself (model.save_pretrained, then huggingface_hub)",
    "torch_compile": "training is not compiled; fasttune's kernels are its fast path",
    "neftune_noise_alpha": "NEFTune embedding noise is not implemented",
    "label_smoothing_factor": "label smoothing is not implemented",
    "lr_scheduler_kwargs": "schedules take no extra arguments (linear, cosine, constant, each with warmup)",
    "optim_args": "optimizers take no extra arguments",
    "optim_target_modules": "GaLore-style optimizers are not implemented",
    "use_liger_kernel": "fasttune has its own kernels; Liger is not used",
    "liger_kernel_config": "fasttune has its own kernels; Liger is not used",
    "load_best_model_at_end": "the adapter of the last step is kept",
    "metric_for_best_model": "the adapter of the last step is kept",
    "resume_from_checkpoint": "call trainer.train(resume_from_checkpoint=True) to resume from output_dir",
    "auto_find_batch_size": "set per_device_train_batch_size explicitly",
    "full_determinism": "not implemented",
    "ignore_data_skip": "resuming always continues the data where the checkpoint left it",
    "dataloader_drop_last": "the last, smaller micro-batch of an epoch is trained too",
    "parallelism_config": ("accelerate's ParallelismConfig is not used: under torchrun fasttune trains with "
                           "DDP, or FSDP2 given fsdp='full_shard'"),
    "torch_compile_backend": "training is not compiled; fasttune's kernels are its fast path",
    "torch_compile_mode": "training is not compiled; fasttune's kernels are its fast path",
    # TRL's SFTConfig
    "shuffle_dataset": "rows are drawn in the order transformers' Trainer draws them, with no extra shuffle",
    "chat_template_path": "set tokenizer.chat_template before building the trainer",
    "model_init_kwargs": "the model is already loaded by FastLanguageModel.from_pretrained",
    "router_aux_loss_coef": "Mixture-of-Experts auxiliary losses are not implemented",
}

# Fields with no effect on what is trained; set to a non-default value they draw one warning listing them.
IGNORED = frozenset(
    {
        "logging_dir",
        "logging_strategy",
        "logging_first_step",
        "logging_nan_inf_filter",
        "run_name",
        "disable_tqdm",
        "dataloader_num_workers",
        "dataloader_pin_memory",
        "dataloader_persistent_workers",
        "dataloader_prefetch_factor",
        "remove_unused_columns",
        "do_train",
        "do_eval",
        "do_predict",
        "eval_accumulation_steps",
        "save_safetensors",
        "save_only_model",
        "ddp_find_unused_parameters",
        "log_level",
        "log_level_replica",
        "include_num_input_tokens_seen",
        "torch_empty_cache_steps",
        "average_tokens_across_devices",
        "gradient_checkpointing_kwargs",
        "tf32",
        "label_names",
        "prediction_loss_only",
        "skip_memory_metrics",
        "hub_model_id",
        "hub_token",
        "hub_private_repo",
        "hub_strategy",
        "project",
        "use_cache",
        "bf16_full_eval",
        "fp16_full_eval",
        "save_on_each_node",
        "log_on_each_node",
        "ddp_timeout",
        "length_column_name",
        "accelerator_config",
        "activation_checkpointing",
        "activation_checkpointing_kwargs",
        "batch_eval_metrics",
        "dataloader_in_order",
        "dataloader_multiprocessing_context",
        "ddp_backend",
        "ddp_broadcast_buffers",
        "ddp_bucket_cap_mb",
        "ddp_static_graph",
        "debug",
        "enable_jit_checkpoint",
        "eval_delay",
        "eval_do_concat_batches",
        "eval_use_gather_object",
        "greater_is_better",
        "hub_always_push",
        "hub_revision",
        "include_for_metrics",
        "local_rank",
        "restore_callback_states_from_checkpoint",
        "trackio_bucket_id",
        "trackio_space_id",
        "trackio_static_space_id",
        # TRL's SFTConfig: padding and memory only (pads are never trained; packing is exact)
        "padding_free",
        "pad_to_multiple_of",
        "pad_token",
        "eval_packing",
        "activation_offloading",
        "trust_remote_code",
    }
)

@dataclass(frozen=True)
class FieldTable:
    """How the fields of one config class are treated: `unsupported` (name -> why) are errors when set,
    `ignored` draw a warning when set, `mapped` are read. `label` names the class in messages."""

    unsupported: dict[str, str]
    ignored: frozenset[str]
    mapped: frozenset[str]
    label: str = "TrainingArguments"

    def knows(self, name: str) -> bool:
        return name in self.unsupported or name in self.ignored or name in self.mapped


OPTIMIZERS = {
    "adamw_torch": "adamw_torch",
    "adamw_torch_fused": "adamw_torch",
    "adamw_hf": "adamw_torch",
    "adamw": "adamw_torch",
    "adamw_8bit": "adamw_8bit",
    "adamw_bnb_8bit": "adamw_8bit",
    "paged_adamw_8bit": "adamw_8bit",
}
SCHEDULES = {
    "linear": "linear",
    "cosine": "cosine",
    "constant": "constant",
    "constant_with_warmup": "constant",
}


@dataclass(init=False)
class TrainingArguments:
    """transformers' `TrainingArguments` fields that fasttune trains with, under the same names and defaults.

    Other transformers field names are accepted as documented in this module (an error or a warning naming
    them); a name neither class knows is a TypeError.
    """

    output_dir: str = "trainer_output"
    per_device_train_batch_size: int = 8
    gradient_accumulation_steps: int = 1
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    num_train_epochs: float = 3.0
    max_steps: int = -1
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0
    warmup_ratio: float = 0.0
    logging_steps: float = 500
    save_strategy: str = "steps"
    save_steps: float = 500
    save_total_limit: int | None = None
    eval_strategy: str = "no"
    eval_steps: float | None = None
    seed: int = 42
    fp16: bool = False
    bf16: bool = False
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = False
    report_to: Any = "none"
    train_sampling_strategy: str = "random"
    fsdp: Any = None  # 'full_shard' (with 'auto_wrap'): FSDP2 under torchrun (`fsdp_mode`)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)  # accepted transformers-only fields
    # which other field names the class accepts, and how each is treated (set below: SFT_FIELDS)
    FIELDS: ClassVar[FieldTable]

    def __init__(self, **kwargs: Any) -> None:
        own = {f.name: f for f in fields(self) if f.name != "extra"}
        if "evaluation_strategy" in kwargs:  # the name before transformers 4.46
            kwargs.setdefault("eval_strategy", kwargs.pop("evaluation_strategy"))
        for f in own.values():
            value = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            setattr(self, f.name, kwargs.pop(f.name, value))
        self.extra = {}
        for name, value in kwargs.items():
            if not self.FIELDS.knows(name):
                raise TypeError(f"{type(self).__name__}: unknown field '{name}'")
            self.extra[name] = value

    def __getattr__(self, name: str) -> Any:
        extra = self.__dict__.get("extra", {})
        if name in extra:
            return extra[name]
        raise AttributeError(f"{type(self).__name__} has no field '{name}'")


@dataclass(init=False)
class SFTConfig(TrainingArguments):
    """TRL's `SFTConfig`: TrainingArguments plus how the dataset is read, with TRL's names and defaults
    (its learning rate, logging interval and checkpointing differ from transformers'). bf16=None, TRL's
    default, means bf16 where the GPU has it (fp32 on a CPU)."""

    learning_rate: float = 2e-5
    logging_steps: float = 10
    gradient_checkpointing: bool = True
    bf16: bool | None = None
    dataset_text_field: str = "text"
    dataset_kwargs: dict | None = None
    eos_token: str | None = None
    max_seq_length: int | None = None
    max_length: int | None = 1024
    packing: bool = False
    assistant_only_loss: bool = False
    completion_only_loss: bool | None = None


# ---- the mapping ----------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def _empty(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, str | list | dict | tuple) and not value)


def _reference(args: Any) -> Any:
    """A default-constructed object of the same class, to tell fields the user set from defaults that
    transformers' __post_init__ rewrote."""
    output_dir = getattr(args, "output_dir", None) or "trainer_output"
    try:
        return type(args)(output_dir=output_dir)
    except Exception:  # e.g. TRL's bf16 default on a machine without bf16: with the user's precision flags
        pass
    try:
        return type(args)(output_dir=output_dir, **{k: getattr(args, k) for k in ("bf16", "fp16", "use_cpu")
                                                   if hasattr(args, k)})
    except Exception:  # a class we cannot build with defaults: compare with field defaults instead
        return None


def changed_fields(args: Any) -> dict[str, Any]:
    """Fields of `args` whose value differs from the class default."""
    if isinstance(args, TrainingArguments):
        out = {
            f.name: getattr(args, f.name)
            for f in fields(args)
            if f.name != "extra" and getattr(args, f.name) != f.default
        }
        return {**out, **args.extra}
    if not dataclasses.is_dataclass(args):
        raise TypeError(f"args must be TrainingArguments or SFTConfig, got {type(args).__name__}")
    ref = _reference(args)
    out = {}
    for f in fields(args):
        value = _plain(getattr(args, f.name, None))
        default = (
            _plain(getattr(ref, f.name, None))
            if ref is not None
            else (f.default if f.default is not dataclasses.MISSING else None)
        )
        if value != default and not (_empty(value) and _empty(default)):
            out[f.name] = value
    return out


MAPPED = frozenset(
    {
        "output_dir",
        "use_cpu",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "learning_rate",
        "weight_decay",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
        "max_grad_norm",
        "num_train_epochs",
        "max_steps",
        "lr_scheduler_type",
        "warmup_steps",
        "warmup_ratio",
        "logging_steps",
        "save_strategy",
        "save_steps",
        "save_total_limit",
        "eval_strategy",
        "eval_steps",
        "seed",
        "fp16",
        "bf16",
        "optim",
        "gradient_checkpointing",
        "report_to",
        "dataset_text_field",
        "max_seq_length",
        "max_length",
        "packing",
        "assistant_only_loss",
        "completion_only_loss",
        "dataset_num_proc",  # tokenizing here is single-process and fast
        # read by sft_args.py (what is trained, and in which order)
        "dataset_kwargs",
        "eos_token",
        "truncation_mode",
        "packing_strategy",
        "loss_type",
        "train_sampling_strategy",
        "group_by_length",
        "data_seed",
        "fsdp",
        "overwrite_output_dir",  # replace an earlier run in output_dir (SFTTrainer.train)
        "eval_on_start",  # SFTTrainer.train: an evaluation before the first step
        "per_device_eval_batch_size",  # SFTTrainer: the batches whose mean losses make eval_loss
    }
)


# TRL's SFTConfig fields among the above; the other TRL configs (notebook/method_args.py) start from
# the rest
SFT_ONLY_MAPPED = frozenset({
    "dataset_text_field", "max_seq_length", "max_length", "packing", "assistant_only_loss",
    "completion_only_loss", "dataset_num_proc", "dataset_kwargs", "eos_token", "truncation_mode",
    "packing_strategy", "loss_type"})
SFT_ONLY_UNSUPPORTED = frozenset({"shuffle_dataset", "chat_template_path", "model_init_kwargs",
                                  "router_aux_loss_coef"})
SFT_ONLY_IGNORED = frozenset({"padding_free", "pad_to_multiple_of", "pad_token", "eval_packing",
                              "activation_offloading", "trust_remote_code"})
# transformers' fields that SFTTrainer reads and the other trainers ignore (with the warning)
SFT_READS_OTHERS_IGNORE = frozenset({"per_device_eval_batch_size"})
SFT_FIELDS = FieldTable(UNSUPPORTED, IGNORED, MAPPED)
# transformers' TrainingArguments alone
TRAINER_FIELDS = FieldTable({k: v for k, v in UNSUPPORTED.items() if k not in SFT_ONLY_UNSUPPORTED},
                            (IGNORED - SFT_ONLY_IGNORED) | SFT_READS_OTHERS_IGNORE,
                            MAPPED - SFT_ONLY_MAPPED - SFT_READS_OTHERS_IGNORE)
TrainingArguments.FIELDS = SFT_FIELDS


def _steps(name: str, value: Any) -> int:
    if isinstance(value, float) and 0 < value < 1:
        raise ValueError(f"{name}={value}: a fraction of the total steps is not supported; give a step count")
    return int(value)


def check_fields(args: Any, table: FieldTable | None = None) -> list[str]:
    """Raise for unsupported fields that are set; return warnings for ignored ones. `table`: how the
    trainer treats the fields (default: the class's own, else SFTTrainer's)."""
    table = table or getattr(type(args), "FIELDS", SFT_FIELDS)
    changed = changed_fields(args)
    for name in changed:
        if name in table.unsupported:
            raise ValueError(
                f"{table.label}.{name}={changed[name]!r} is not supported by fasttune: "
                f"{table.unsupported[name]}"
            )
    ignored = sorted(n for n in changed if n not in table.mapped)
    return (
        [f"{table.label}: fasttune ignores {', '.join(ignored)} (no effect on what is trained)"]
        if ignored
        else []
    )


FSDP_OPTIONS = ("full_shard", "auto_wrap")


def fsdp_mode(value: Any) -> str:
    """`fsdp` -> TrainConfig.distributed: 'full_shard' (optionally with 'auto_wrap') is what FSDP2 does under
    torchrun (parameters, gradients and optimizer state sharded, one unit per decoder layer): 'fsdp'.
    Unset: 'auto'. Any other FSDP option is an error naming it."""
    value = _plain(value)
    if _empty(value):
        return "auto"
    if value is True:
        return "fsdp"
    words = value.split() if isinstance(value, str) else [str(_plain(v)) for v in value]
    other = [w for w in words if w not in FSDP_OPTIONS]
    if other or "full_shard" not in words:
        raise ValueError(f"TrainingArguments.fsdp={value!r}: fasttune's FSDP2 under torchrun is full_shard "
                         f"(auto_wrap per decoder layer); {', '.join(other) or 'without full_shard'} is not "
                         "supported")
    return "fsdp"


def to_train_config(
    args: Any, *, device_type: str, gradient_checkpointing: str | None = None, warn: bool = True,
    table: FieldTable | None = None, epoch_strategies: bool = False,
) -> TrainConfig:
    """fasttune's TrainConfig for `args`; warnings name every field that is set but has no effect here.

    gradient_checkpointing: the mode get_peft_model chose ('on', 'offload', 'off'); it wins over the
    `gradient_checkpointing` flag of args. `table`: as for check_fields. `epoch_strategies`: the caller's
    epochs end on whole steps and it sets the 'epoch' intervals (`epoch_intervals`) once it knows an
    epoch's steps; until then they are 0. Without it 'epoch' is refused.
    """
    notes = check_fields(args, table)
    get = lambda name, default=None: _plain(getattr(args, name, default))  # noqa: E731
    if get("use_cpu") and device_type != "cpu":  # the device is the model's; this flag can only agree with it
        raise ValueError(f"TrainingArguments.use_cpu=True, but the model is on {device_type}: load it with "
                         "FastLanguageModel.from_pretrained(..., device='cpu') to train on the CPU")
    optim = str(get("optim", "adamw_torch"))
    if optim not in OPTIMIZERS:
        raise ValueError(
            f"TrainingArguments.optim={optim!r} is not supported (use one of {sorted(OPTIMIZERS)})"
        )
    optim = OPTIMIZERS[optim]
    if optim == "adamw_8bit" and device_type != "cuda":
        notes.append(
            f"TrainingArguments.optim={get('optim')!r} needs bitsandbytes on a CUDA GPU; training on "
            f"{device_type} with adamw_torch"
        )
        optim = "adamw_torch"
    schedule = str(get("lr_scheduler_type", "linear"))
    if schedule not in SCHEDULES:
        raise ValueError(
            f"TrainingArguments.lr_scheduler_type={schedule!r} is not supported "
            f"(use one of {sorted(SCHEDULES)})"
        )
    if get("fp16") and get("bf16"):
        raise ValueError("TrainingArguments: fp16=True and bf16=True exclude each other")
    precision = "bf16" if get("bf16") else "fp16" if get("fp16") else "auto"
    if precision == "fp16" and device_type != "cuda":
        notes.append(f"TrainingArguments.fp16=True needs a CUDA GPU; training on {device_type} in fp32")
        precision = "fp32"
    warmup, ratio = get("warmup_steps", 0) or 0, float(get("warmup_ratio", 0.0) or 0.0)
    if isinstance(warmup, float) and 0 < warmup < 1:  # transformers 5: a float below 1 is a ratio
        warmup, ratio = 0, warmup
    if schedule == "constant" and (warmup or ratio):  # transformers' constant schedule has no warm-up
        notes.append("TrainingArguments.lr_scheduler_type='constant' takes no warm-up (as in transformers): "
                     "warmup_steps/warmup_ratio are not used; 'constant_with_warmup' warms up")
        warmup, ratio = 0, 0.0
    save_strategy, eval_strategy = str(get("save_strategy", "steps")), str(get("eval_strategy", "no"))
    if save_strategy == "best":
        raise ValueError("TrainingArguments.save_strategy='best' saves on the best metric_for_best_model, "
                         "which fasttune does not track; use 'steps'")
    for name, strategy in (("save_strategy", save_strategy), ("eval_strategy", eval_strategy)):
        if strategy == "epoch" and not epoch_strategies:
            every = name.split("_")[0] + "_steps"
            raise ValueError(f"TrainingArguments.{name}='epoch' is not supported by GRPOTrainer, whose "
                             f"epochs do not end on a whole step; use 'steps' with {every}")
        if strategy not in ("steps", "no", "epoch"):
            raise ValueError(f"TrainingArguments.{name}={strategy!r}: expected 'steps', 'epoch' or 'no'")
    if get("average_tokens_across_devices", True) is False and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("TrainingArguments.average_tokens_across_devices=False is not supported: fasttune "
                         "divides each window's loss by the trained tokens of every rank (True)")
    report_to = notebook_report_to(get("report_to"))
    if gradient_checkpointing is None:
        gradient_checkpointing = "on" if get("gradient_checkpointing") else "off"
    eval_steps = get("eval_steps")
    cfg = TrainConfig(
        output_dir=str(get("output_dir") or "trainer_output"),
        report_to=report_to,
        per_device_train_batch_size=int(get("per_device_train_batch_size", 8)),
        gradient_accumulation_steps=int(get("gradient_accumulation_steps", 1)),
        max_steps=int(get("max_steps", -1)),
        num_train_epochs=float(get("num_train_epochs", 3.0)),
        learning_rate=float(get("learning_rate", 5e-5)),
        warmup_steps=_steps("warmup_steps", warmup),
        warmup_ratio=ratio,
        lr_scheduler_type=SCHEDULES[schedule],
        optim=optim,
        weight_decay=float(get("weight_decay", 0.0)),
        adam_beta1=float(get("adam_beta1", 0.9)),
        adam_beta2=float(get("adam_beta2", 0.999)),
        adam_epsilon=float(get("adam_epsilon", 1e-8)),
        max_grad_norm=float(get("max_grad_norm", 1.0) or 0.0),
        precision=precision,
        gradient_checkpointing=gradient_checkpointing,
        logging_steps=max(1, _steps("logging_steps", get("logging_steps", 500))),
        save_steps=0 if save_strategy != "steps" else _steps("save_steps", get("save_steps", 500)),
        save_total_limit=max(0, int(get("save_total_limit") or 0)),  # None or 0: keep all, as transformers
        eval_steps=0
        if eval_strategy != "steps"
        else _steps("eval_steps", eval_steps or get("logging_steps")),
        seed=int(get("seed", 42)),
        distributed=fsdp_mode(get("fsdp")),
        show_samples=0,
        report=False,
        overwrite=bool(get("overwrite_output_dir", False)),
    )
    if warn:
        for note in notes:
            warnings.warn(note, UserWarning, stacklevel=3)
    return cfg


def epoch_intervals(args: Any, steps_per_epoch: int) -> dict[str, int]:
    """The TrainConfig intervals that `save_strategy` / `eval_strategy` 'epoch' set: every epoch's last step,
    for a trainer whose epochs end on whole steps (transformers' Trainer ends each epoch on a shorter
    accumulation window); the run's last step saves and evaluates anyway."""
    fields = {"save_strategy": "save_steps", "eval_strategy": "eval_steps"}
    return {steps: steps_per_epoch for name, steps in fields.items()
            if str(_plain(getattr(args, name, "no"))) == "epoch"}


def notebook_report_to(report: Any) -> list[str]:
    """TrainingArguments.report_to as TrainConfig.report_to: a name or a list of names; None, 'none' or []
    for none; 'all', as in transformers, every supported tracker whose library is installed."""
    import importlib.util

    from fasttune.config import ConfigError
    from fasttune.train.trackers import TRACKERS, tracker_names

    if report is None or report == [] or report == "none":
        return ["none"]
    if report == "all":
        return [n for n, (module, _) in TRACKERS.items() if importlib.util.find_spec(module)] or ["none"]
    names = [report] if isinstance(report, str) else list(report)
    try:
        return tracker_names(names) or ["none"]
    except ConfigError as e:
        raise ValueError(f"TrainingArguments.{e}") from None
