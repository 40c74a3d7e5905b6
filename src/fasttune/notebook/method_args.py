"""TRL's `DPOConfig`, `ORPOConfig`, `KTOConfig` and `GRPOConfig`: names, defaults, and how fasttune reads each
field onto the run configuration of `fasttune train --method dpo|orpo|kto|grpo`.

`args` may be these classes or TRL's own. Each field of TRL's config (1.x, plus the older `max_prompt_length`
and `max_completion_length` of DPO and GRPO) is read, or refused by name where honouring it would need what
fasttune does not do (an error), or named in a warning where it changes only speed or logging — the rules
of `SFTConfig` (notebook/arguments.py), whose transformers fields these configs share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fasttune.config import MethodConfig
from fasttune.notebook.arguments import TRAINER_FIELDS, FieldTable, TrainingArguments, _plain

SYNC = "the reference is the model with its adapter switched off; it is never synced with the policy"
VLLM = "vLLM is not used: fasttune samples with its own decoder"
COMMON_UNSUPPORTED = {
    "model_init_kwargs": "the model is already loaded by FastLanguageModel.from_pretrained",
    "router_aux_loss_coef": "Mixture-of-Experts auxiliary losses are not implemented",
    "sync_ref_model": SYNC,
}
COMMON_IGNORED = {
    "trust_remote_code",
    "pad_to_multiple_of",
    "padding_free",
    "pad_token",
    "activation_offloading",
    "ref_model_mixup_alpha",
    "ref_model_sync_steps",
    "padding_value",
    "label_pad_token_id",
    "dataset_num_proc",
}
COMMON_MAPPED = {"beta", "max_prompt_length", "disable_dropout"}

DPO_UNSUPPORTED = {
    "loss_weights": "one loss is trained, sigmoid or ipo, not a weighted mix",
    "ld_alpha": "LD-DPO's length weighting is not implemented",
    "f_divergence_type": "the divergence is the reverse KL of DPO",
    "label_smoothing": "robust/conservative DPO (label smoothing) is not implemented",
    "use_weighting": "WPO weighting is not implemented",
    "rpo_alpha": "RPO's extra NLL term is not implemented",
    "reference_free": "the reference is the model with its adapter switched off",
    "generate_during_eval": "no generation at evaluation; evaluation reports the loss and rewards",
    "use_liger_loss": "fasttune has its own kernels; Liger is not used",
    "model_adapter_name": "the policy is the model's one adapter",
    "ref_adapter_name": "the reference is the model with its adapter switched off",
    "force_use_ref_model": "the reference is the model with its adapter switched off",
    "tools": "tool definitions in the chat template are not supported",
}
DPO_IGNORED = {
    "precompute_ref_log_probs",
    "precompute_ref_batch_size",
    "f_alpha_divergence_coef",
    "discopop_tau",
    "use_logits_to_keep",
}
GRPO_UNSUPPORTED = {
    "generation_kwargs": "sampling takes temperature and top_p only",
    "chat_template_kwargs": "the chat template is rendered with its defaults",
    "max_tool_calling_iterations": "tool calling is not supported",
    "off_policy_mask_threshold": "off-policy masking is not implemented",
    "cast_lm_head_to_fp32": "the head runs in the model's compute precision",
    "sync_ref_model": SYNC,
}
GRPO_IGNORED = {
    "num_generations_eval",
    "ds3_gather_for_generation",
    "cache_implementation",
    "log_completions",
    "log_multimodal",
    "num_completions_to_print",
    "log_unique_prompts",
    "log_completions_hub_repo",
    "wandb_log_unique_prompts",
    "use_transformers_continuous_batching",
    "transformers_continuous_batching_config",
    "use_transformers_paged",
    "sapo_temperature_neg",
    "sapo_temperature_pos",
    "vespo_k_pos",
    "vespo_lambda_pos",
    "vespo_k_neg",
    "vespo_lambda_neg",
    "entropy_coef_min",
    "entropy_coef_max",
    "entropy_coef_delta",
    "entropy_target",
    "use_vllm",
    "vllm_mode",
    "vllm_model_impl",
    "vllm_enable_sleep_mode",
    "vllm_structured_outputs_regex",
    "vllm_server_base_url",
    "vllm_server_host",
    "vllm_server_port",
    "vllm_server_timeout",
    "vllm_group_port",
    "vllm_gpu_memory_utilization",
    "vllm_max_model_length",
    "vllm_tensor_parallel_size",
    "vllm_importance_sampling_correction",
    "vllm_importance_sampling_mode",
    "vllm_importance_sampling_clip_max",
    "vllm_importance_sampling_clip_min",
    "vllm_importance_sampling_cap",
    "vllm_guided_decoding_regex",
    "vllm_device",
    "vllm_dtype",
}
GRPO_MAPPED = {
    "num_generations",
    "max_completion_length",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "num_iterations",
    "epsilon",
    "epsilon_high",
    "delta",
    "reward_weights",
    "loss_type",
    "scale_rewards",
    "importance_sampling_level",
    "multi_objective_aggregation",
    "mask_truncated_completions",
    "top_entropy_quantile",
    "entropy_coef",
    "use_adaptive_entropy",
    "use_bias_correction_kl",
    "generation_batch_size",
    "steps_per_generation",
    "shuffle_dataset",
}

# field -> (the values fasttune honours, why others are refused), per method
ALLOWED: dict[str, dict[str, tuple[tuple[Any, ...], str]]] = {
    "dpo": {
        "truncation_mode": (("keep_start",), "a pair longer than max_length keeps its start"),
        "loss_type": (("sigmoid", "ipo"), "the DPO losses are sigmoid (DPO) and ipo (IPO)"),
    },
    "orpo": {"is_encoder_decoder": ((None, False), "decoder-only models only")},
    "kto": {"loss_type": (("kto",), "the KTO loss is 'kto'")},
    "grpo": {
        "loss_type": (("dapo", "grpo"), "the GRPO losses are dapo and grpo"),
        "top_k": ((0, None), "sampling takes temperature and top_p only"),
        "min_p": ((None,), "sampling takes temperature and top_p only"),
        "repetition_penalty": ((1.0,), "sampling takes temperature and top_p only"),
        "scale_rewards": (("group", True), "advantages are normalised by the std of each group"),
        "importance_sampling_level": (("token",), "the probability ratio is per token"),
        "multi_objective_aggregation": (
            ("sum_then_normalize",),
            "the weighted sum of the rewards is normalised per group",
        ),
        "mask_truncated_completions": ((False,), "truncated completions are trained"),
        "delta": ((None,), "two-sided clipping (delta) is not implemented"),
        "top_entropy_quantile": ((1.0,), "every completion token is trained"),
        "entropy_coef": ((0.0,), "no entropy bonus is implemented"),
        "use_adaptive_entropy": ((False,), "no entropy bonus is implemented"),
        "use_bias_correction_kl": ((True,), "the KL term is TRL's bias-corrected estimate"),
    },
}
TRAIN_ORDER = {"random": True, "sequential": False}


def _table(label: str, unsupported: dict[str, str], ignored: set[str], mapped: set[str]) -> FieldTable:
    return FieldTable(
        {**TRAINER_FIELDS.unsupported, **COMMON_UNSUPPORTED, **unsupported},
        TRAINER_FIELDS.ignored | COMMON_IGNORED | ignored,
        TRAINER_FIELDS.mapped | COMMON_MAPPED | mapped,
        label,
    )


TABLES = {
    "dpo": _table(
        "DPOConfig",
        DPO_UNSUPPORTED,
        DPO_IGNORED,
        {"max_length", "truncation_mode", "loss_type", "max_completion_length"},
    ),
    "orpo": _table(
        "ORPOConfig",
        {"generate_during_eval": DPO_UNSUPPORTED["generate_during_eval"]},
        {"max_completion_length"},
        {"max_length", "is_encoder_decoder"},
    ),
    "kto": _table(
        "KTOConfig",
        {},
        {"precompute_ref_log_probs", "precompute_ref_batch_size"},
        {"max_length", "loss_type", "desirable_weight", "undesirable_weight", "max_completion_length"},
    ),
    "grpo": _table("GRPOConfig", GRPO_UNSUPPORTED, GRPO_IGNORED, GRPO_MAPPED),
}


@dataclass(init=False)
class _MethodArgs(TrainingArguments):
    """TRL's defaults shared by its preference and RL configs."""

    learning_rate: float = 1e-6
    logging_steps: float = 10
    gradient_checkpointing: bool = True
    bf16: bool | None = None
    beta: float = 0.1
    max_prompt_length: int | None = None  # TRL before 1.0: each prompt keeps its last N tokens
    disable_dropout: bool = True


@dataclass(init=False)
class DPOConfig(_MethodArgs):
    """TRL's `DPOConfig`: loss_type 'sigmoid' (DPO) or 'ipo' (IPO, beta as its tau)."""

    FIELDS = TABLES["dpo"]
    max_length: int | None = 1024
    loss_type: Any = "sigmoid"
    truncation_mode: str = "keep_start"
    max_completion_length: int | None = None  # TRL before 1.0: each completion keeps its first N tokens


@dataclass(init=False)
class ORPOConfig(_MethodArgs):
    """TRL's `ORPOConfig`: beta is the weight lambda of the odds-ratio term."""

    FIELDS = TABLES["orpo"]
    max_length: int | None = 1024
    max_completion_length: int | None = None  # encoder-decoder models only, in TRL too


@dataclass(init=False)
class KTOConfig(_MethodArgs):
    """TRL's `KTOConfig`; its rows are drawn in dataset order unless train_sampling_strategy='random'."""

    FIELDS = TABLES["kto"]
    max_length: int | None = 1024
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    train_sampling_strategy: str = "sequential"
    max_completion_length: int | None = None  # TRL before 1.0: each completion keeps its first N tokens


@dataclass(init=False)
class GRPOConfig(_MethodArgs):
    """TRL's `GRPOConfig`: per_device_train_batch_size counts completions (a multiple of num_generations);
    beta 0 means no KL term and no reference pass."""

    FIELDS = TABLES["grpo"]
    beta: float = 0.0
    disable_dropout: bool = False
    num_generations: int = 8
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    num_iterations: int = 1
    epsilon: float = 0.2
    epsilon_high: float | None = None
    reward_weights: list[float] | None = None
    loss_type: str = "dapo"
    scale_rewards: Any = "group"
    shuffle_dataset: bool = True
    generation_batch_size: int | None = None
    steps_per_generation: int | None = None


CONFIGS = {"dpo": DPOConfig, "orpo": ORPOConfig, "kto": KTOConfig, "grpo": GRPOConfig}


def _get(args: Any, name: str, default: Any = None) -> Any:
    return _plain(getattr(args, name, default))


@dataclass
class MethodOptions:
    """What the notebook trainer reads from a TRL config beyond TrainConfig."""

    method: MethodConfig
    max_length: int | None
    max_prompt_length: int | None
    max_completion_length: int | None  # cut of each completion (dpo, kto); grpo's is in `method`
    shuffle: bool
    disable_dropout: bool


def _loss_type(args: Any, method: str) -> str | None:
    value = _get(args, "loss_type")
    if isinstance(value, list | tuple):  # TRL 1.x keeps DPO's loss_type as a list of losses
        if len(value) != 1:
            raise ValueError(
                f"{TABLES[method].label}.loss_type={value!r} is not supported by fasttune: one loss "
                "is trained, not a weighted mix"
            )
        value = _plain(value[0])
    return value


def check_values(args: Any, method: str) -> None:
    """Every field with a restricted set of values holds one fasttune honours."""
    label = TABLES[method].label
    for name, (allowed, why) in ALLOWED[method].items():
        value = _loss_type(args, method) if name == "loss_type" else _get(args, name, allowed[0])
        if value not in allowed:
            raise ValueError(
                f"{label}.{name}={value!r} is not supported by fasttune ({why}); use "
                + " or ".join(repr(a) for a in allowed)
            )
    order = _get(args, "train_sampling_strategy", "random")
    if order not in TRAIN_ORDER:
        raise ValueError(
            f"{label}.train_sampling_strategy={order!r} is not supported for {method} (its "
            "micro-batches hold whole pairs, rows or groups); use 'random' or 'sequential'"
        )
    if _get(args, "group_by_length"):
        raise ValueError(f"{label}.group_by_length=True is not supported for {method}; leave it off")
    if method == "grpo":
        _check_grpo(args, label)


def _check_grpo(args: Any, label: str) -> None:
    eps, high = float(_get(args, "epsilon", 0.2)), _get(args, "epsilon_high")
    if high is not None and float(high) != eps:
        raise ValueError(
            f"{label}.epsilon_high={high!r} is not supported by fasttune: the clipping range is "
            f"symmetric (epsilon={eps})"
        )
    # TRL samples one generation batch per optimiser step by default: steps_per_generation = accumulation
    accumulation = int(_get(args, "gradient_accumulation_steps", 1))
    steps = _get(args, "steps_per_generation")
    if steps is not None and int(steps) != accumulation:
        raise ValueError(
            f"{label}.steps_per_generation={steps!r} is not supported by fasttune: completions are "
            f"sampled once per optimiser step (gradient_accumulation_steps={accumulation})"
        )
    size = _get(args, "generation_batch_size")
    per_step = int(_get(args, "per_device_train_batch_size", 8)) * accumulation
    if size is not None and int(size) != per_step:
        raise ValueError(
            f"{label}.generation_batch_size={size!r} is not supported by fasttune: each optimiser "
            "step samples per_device_train_batch_size x gradient_accumulation_steps = "
            f"{per_step} completions"
        )


def method_options(args: Any, method: str) -> MethodOptions:
    """The method settings of a TRL config (ours or TRL's), checked."""
    check_values(args, method)
    label = TABLES[method].label
    beta = float(_get(args, "beta", 0.1))
    if beta < 0:
        raise ValueError(f"{label}.beta={beta} must be >= 0")
    values: dict[str, Any] = {"method": method, "beta": beta}
    if method in ("dpo", "kto"):
        values["loss_type"] = _loss_type(args, method) if method == "dpo" else None
    if method == "kto":
        values.update(
            desirable_weight=float(_get(args, "desirable_weight", 1.0)),
            undesirable_weight=float(_get(args, "undesirable_weight", 1.0)),
        )
    completion_cut = _get(args, "max_completion_length") if method in ("dpo", "kto") else None
    if method == "grpo":
        weights = _get(args, "reward_weights")
        values.update(
            num_generations=int(_get(args, "num_generations", 8)),
            max_completion_length=int(_get(args, "max_completion_length", 512)),
            temperature=float(_get(args, "temperature", 1.0)),
            top_p=float(_get(args, "top_p", 1.0)),
            epsilon=float(_get(args, "epsilon", 0.2)),
            num_iterations=int(_get(args, "num_iterations", 1)),
            loss_type=_get(args, "loss_type", "dapo"),
            reward_weights=None if weights is None else [float(w) for w in weights],
        )
    try:
        me = MethodConfig(**values)
    except TypeError as e:  # pragma: no cover - a field name out of step with MethodConfig
        raise ValueError(f"{label}: {e}") from None
    order = _get(args, "train_sampling_strategy", "random")
    shuffle = TRAIN_ORDER[order] and (method != "grpo" or bool(_get(args, "shuffle_dataset", True)))
    length = None if method == "grpo" else _get(args, "max_length", 1024)
    prompt_cut = _get(args, "max_prompt_length")
    for name, value in (
        ("max_length", length),
        ("max_prompt_length", prompt_cut),
        ("max_completion_length", completion_cut),
    ):
        if value is not None and int(value) <= 0:
            raise ValueError(f"{label}.{name}={value!r} must be a positive number of tokens, or None")
    return MethodOptions(
        me,
        None if length is None else int(length),
        None if prompt_cut is None else int(prompt_cut),
        None if completion_cut is None else int(completion_cut),
        shuffle,
        bool(_get(args, "disable_dropout", method != "grpo")),
    )


def default_args(method: str) -> Any:
    return CONFIGS[method](output_dir="trainer_output")


__all__ = ["DPOConfig", "GRPOConfig", "KTOConfig", "MethodOptions", "ORPOConfig", "method_options"]
