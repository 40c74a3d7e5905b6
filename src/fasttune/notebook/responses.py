"""Unsloth's `train_on_responses_only(trainer, instruction_part=..., response_part=...)`: train on the
responses of an already prepared dataset only, with Unsloth's names and matching rules.

The two parts are found as token sequences (each tokenized alone, without special tokens: Unsloth's
`force_match=True`). A label stays trained only from just after an occurrence of `response_part` up to
the next occurrence of `instruction_part` (not included), or to the end of the row; everything else
becomes -100. Searching for the next response resumes one token past the end of that instruction part.
Rows left with nothing trained are dropped, and counted in a warning. As Unsloth's sets transformers'
`DataCollatorForSeq2Seq`, the masked labels are then trained as they are, whatever collator the trainer
was given (`notebook/collators.py`).

Worked example, instruction_part "### Q:", response_part "### A:" (tokens shown as words):
    input_ids  ### Q: hi ### A: yo EOS ### Q: why ### A: so EOS
    labels     -   -  -  -   -  yo EOS -   -  -   -   -  so EOS
"""

from __future__ import annotations

import warnings
from typing import Any

from fasttune.models.base import IGNORE_INDEX


def _at(ids: list[int], j: int, part: list[int]) -> bool:
    return ids[j:j + len(part)] == part


def response_labels(input_ids: list[int], labels: list[int], instruction: list[int],
                    response: list[int]) -> list[int]:
    """`labels` kept where a response is (see the module docstring), -100 elsewhere."""
    n = len(input_ids)
    out = [IGNORE_INDEX] * n
    j = 0
    while j < n:
        if not _at(input_ids, j, response):
            j += 1
            continue
        start = k = j + len(response)
        end = None
        while k < n:
            # The last position ends the response even where an instruction part starts there.
            if k == n - 1:
                end = n
                break
            if _at(input_ids, k, instruction):
                end = k
                break
            k += 1
        if end is None:  # the response part ends the row: nothing follows it
            j = start + 1
            continue
        out[start:end] = labels[start:end]
        j = n if end == n else end + len(instruction) + 1
    return out


def _part_ids(tokenizer: Any, part: Any, name: str) -> list[int]:
    if not isinstance(part, str) or not part:
        raise ValueError(f"train_on_responses_only: {name} must be a non-empty string, got {part!r}")
    ids = list(tokenizer(part, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ValueError(f"train_on_responses_only: {name}={part!r} tokenizes to nothing")
    return ids


def train_on_responses_only(trainer: Any, instruction_part: str | None = None,
                            response_part: str | None = None, force_match: bool = True, tokenizer: Any = None,
                            return_function: bool = False, num_proc: int | None = None) -> Any:
    """Mask everything but the responses in `trainer`'s prepared train (and eval) dataset; return the trainer.

    return_function=True returns instead the function Unsloth returns: batch {"input_ids": [...],
    optional "labels": [...]} -> {"labels": [...]}. num_proc is accepted and has no effect (the masking
    runs in this process).
    """
    if instruction_part is None or response_part is None:
        raise ValueError("train_on_responses_only: instruction_part and response_part must be given")
    if not force_match:
        raise ValueError("train_on_responses_only: force_match=False (matching the parts with extra spaces "
                         "and newlines around them) is not supported; fasttune matches the parts' own tokens")
    if tokenizer is None:
        tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("train_on_responses_only: no tokenizer (pass tokenizer=)")
    instruction = _part_ids(tokenizer, instruction_part, "instruction_part")
    response = _part_ids(tokenizer, response_part, "response_part")

    def masked(batch: dict[str, Any]) -> dict[str, Any]:
        ids_list = batch["input_ids"]
        old = batch.get("labels") or ids_list
        return {"labels": [response_labels(list(ids), list(lab), instruction, response)
                           for ids, lab in zip(ids_list, old)]}

    if return_function:
        return masked
    for attr in ("train_dataset", "eval_dataset"):
        data = getattr(trainer, attr, None)
        if data is None:
            continue
        if not hasattr(data, "examples"):
            raise TypeError(f"train_on_responses_only: trainer.{attr} is not a dataset prepared by "
                            "fasttune's SFTTrainer")
        _mask_examples(data, instruction, response, response_part, attr)
    if hasattr(trainer, "untrained_token"):  # Unsloth sets DataCollatorForSeq2Seq: these labels are trained
        trainer.untrained_token = None
    return trainer


def _mask_examples(data: Any, instruction: list[int], response: list[int], response_part: str,
                   attr: str) -> None:
    kept = []
    for ex in data.examples:
        ex.labels = response_labels(ex.input_ids, ex.labels, instruction, response)
        if ex.n_trained:
            kept.append(ex)
    dropped = len(data.examples) - len(kept)
    if not kept:
        raise ValueError(f"train_on_responses_only: no row of trainer.{attr} contains response_part="
                         f"{response_part!r} as tokens (with text after it): nothing would be trained")
    if dropped:
        warnings.warn(f"train_on_responses_only: dropped {dropped} of {len(data.examples)} rows of "
                      f"trainer.{attr} with nothing left to train (no response_part, or it was cut off)",
                      UserWarning, stacklevel=3)
    data.examples[:] = kept


__all__ = ["response_labels", "train_on_responses_only"]
