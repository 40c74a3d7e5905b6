"""The TRL / transformers settings that decide which tokens are trained and in which order: read from
`args` (fasttune's or the real SFTConfig / TrainingArguments) and SFTTrainer's keywords, each honoured as
TRL and Unsloth honour it or refused with a message naming it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fasttune.notebook.arguments import changed_fields
from fasttune.notebook.dataset import DATASET_KWARGS, TextOptions

# field: (the values fasttune honours, why others are refused)
ALLOWED_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "truncation_mode": (("keep_start",), "rows longer than max_length keep their start"),
    "packing_strategy": (("bfd",), "packing is best-fit decreasing, a longer row cut to max_length"),
    "loss_type": (("nll", "chunked_nll"), "the loss is the mean token negative log-likelihood"),
    "train_sampling_strategy": (("random", "group_by_length"), "rows are drawn at random, or grouped by "
                                "length"),
}


def _get(args: Any, name: str, default: Any = None) -> Any:
    value = getattr(args, name, default)
    return getattr(value, "value", value)  # enums of transformers' fields


@dataclass
class Sampling:
    """How the rows of an epoch are ordered: transformers' Trainer order with this seed, optionally
    grouped by length."""

    seed: int
    group_by_length: bool


def check_values(args: Any) -> None:
    for name, (allowed, why) in ALLOWED_VALUES.items():
        value = _get(args, name, allowed[0])
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not supported by fasttune ({why}); use "
                             + " or ".join(repr(a) for a in allowed))


def text_options(args: Any, dataset_text_field: str | None, dataset_kwargs: dict | None) -> TextOptions:
    """What is read from each row and how it is tokenized."""
    check_values(args)
    kwargs = {**(_get(args, "dataset_kwargs") or {}), **(dataset_kwargs or {})}
    unknown = sorted(k for k in kwargs if k not in DATASET_KWARGS)
    if unknown:
        raise ValueError(f"dataset_kwargs: {', '.join(unknown)} not supported (fasttune takes "
                         f"{', '.join(DATASET_KWARGS)})")
    completion_only = _get(args, "completion_only_loss")
    return TextOptions(
        text_field=dataset_text_field or _get(args, "dataset_text_field") or "text",
        eos_token=_get(args, "eos_token"),
        add_special_tokens=bool(kwargs.get("add_special_tokens", True)),
        skip_prepare=bool(kwargs.get("skip_prepare_dataset", False)),
        completion_only_loss=None if completion_only is None else bool(completion_only),
        assistant_only_loss=bool(_get(args, "assistant_only_loss", False)),
    )


def max_length(args: Any, keyword: int | None, model_max: int | None) -> int | None:
    """The longest training example: SFTTrainer(max_seq_length=) (Unsloth's), args.max_seq_length (older
    TRL) or args.max_length set away from its default (TRL; None: no truncation), else the model's
    max_seq_length (Unsloth's default), else TRL's 1024. Two different explicit values are an error."""
    changed = changed_fields(args)
    given = {}
    if keyword is not None:
        given["SFTTrainer(max_seq_length)"] = int(keyword)
    if changed.get("max_seq_length") is not None:
        given["args.max_seq_length"] = int(changed["max_seq_length"])
    if "max_length" in changed:
        value = changed["max_length"]
        given["args.max_length"] = None if value is None else int(value)
    if len(set(given.values())) > 1:
        raise ValueError("conflicting maximum lengths: "
                         + ", ".join(f"{k}={v}" for k, v in given.items()) + "; give one")
    if given:
        return next(iter(given.values()))
    return model_max or 1024


def sampling(args: Any) -> Sampling:
    """transformers' row order (seeded by data_seed, else seed) and its group_by_length (the field of
    transformers 4, or train_sampling_strategy='group_by_length' of transformers 5)."""
    seed = _get(args, "data_seed")
    seed = int(_get(args, "seed", 42) if seed is None else seed)
    grouped = bool(_get(args, "group_by_length", False))
    grouped = grouped or _get(args, "train_sampling_strategy", "random") == "group_by_length"
    return Sampling(seed=seed, group_by_length=grouped)
