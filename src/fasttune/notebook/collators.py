"""The `data_collator` an SFTTrainer may be given, applied as Unsloth's SFTTrainer applies it.

Unsloth's conversational notebooks pass transformers' `DataCollatorForSeq2Seq(tokenizer=tokenizer)`.
Unsloth's SFTTrainer keeps that collator when the train dataset has a `labels` column and otherwise puts
transformers' `DataCollatorForLanguageModeling(tokenizer, mlm=False)` in its place (and the reverse for
that collator); its `train_on_responses_only` then sets `DataCollatorForSeq2Seq`. fasttune pads and
batches rows itself (pads are never trained), so what is left of a collator is what it trains:
- `DataCollatorForSeq2Seq` on rows with labels: those labels (padding with -100);
- `DataCollatorForLanguageModeling(mlm=False)`: labels = input_ids, -100 wherever the token is the
  tokenizer's pad token. Where the pad token is also EOS (SmolLM2's `<|im_end|>`), EOS and every other
  occurrence of that token are then left untrained.

Worked example, SmolLM2's tokenizer (pad = EOS = `<|im_end|>`), text rows, DataCollatorForSeq2Seq:
    input_ids  <|im_start|>  user  hi  <|im_end|>  <|im_start|>  assistant  yo  <|im_end|>
    labels     <|im_start|>  user  hi  -100        <|im_start|>  assistant  yo  -100
After `train_on_responses_only(trainer, ...)` the labels are its mask of the rows, as prepared.
Any other collator, or one of these set to train something else, is refused.
"""

from __future__ import annotations

from typing import Any

from fasttune.models.base import IGNORE_INDEX

# the kinds of prepared rows (`notebook.dataset`) whose labels a collator may set: whole texts, token ids
COLLATED_KINDS = ("text", "tokenized")


def has_labels(dataset: Any) -> bool:
    """Whether the train dataset as given has a `labels` column (what Unsloth's SFTTrainer checks)."""
    names = getattr(dataset, "column_names", None)
    if isinstance(names, list | tuple):
        return "labels" in names
    if isinstance(dataset, list | tuple) and dataset and isinstance(dataset[0], dict):
        return "labels" in dataset[0]
    return False


def untrained_token(collator: Any, labels_given: bool, kind: str, tokenizer: Any) -> int | None:
    """The token id whose positions `collator` leaves untrained (the language-modeling collator's pad token),
    or None where the prepared labels are trained as they are. Raises ValueError for a collator whose
    effect fasttune does not reproduce."""
    if collator is None:
        return None
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq

    name = type(collator).__name__
    if isinstance(collator, DataCollatorForSeq2Seq):
        if collator.label_pad_token_id != IGNORE_INDEX:
            raise ValueError("SFTTrainer: DataCollatorForSeq2Seq(label_pad_token_id="
                             f"{collator.label_pad_token_id}) would train the padding; fasttune never trains "
                             "pads (use the default, -100)")
        if collator.padding is False or getattr(collator.padding, "value", collator.padding) == "do_not_pad":
            raise ValueError("SFTTrainer: DataCollatorForSeq2Seq(padding=False) cannot batch rows of "
                             "different lengths; drop padding=False (fasttune pads each batch to its longest "
                             "row)")
        lm_tokenizer = tokenizer  # Unsloth's swap builds the LM collator on the trainer's tokenizer
    elif isinstance(collator, DataCollatorForLanguageModeling):
        if collator.mlm:
            raise ValueError("SFTTrainer: DataCollatorForLanguageModeling(mlm=True) masks tokens for a "
                             "masked language model; fine-tuning a causal model needs mlm=False")
        lm_tokenizer = collator.tokenizer
    else:
        raise ValueError(
            f"SFTTrainer: data_collator {name} is not supported; fasttune batches (and packs) rows itself. "
            "transformers' DataCollatorForSeq2Seq and DataCollatorForLanguageModeling(mlm=False) are taken, "
            "as Unsloth's SFTTrainer applies them")
    if kind not in COLLATED_KINDS:
        raise ValueError(
            f"SFTTrainer: data_collator {name} with {kind} rows is not supported: the collator would drop "
            "the mask TRL makes for them; drop data_collator (the mask is applied), or give the rows as a "
            "text column")
    if labels_given:
        return None
    pad = getattr(lm_tokenizer, "pad_token_id", None)
    return None if pad is None else int(pad)


def leave_untrained(examples: list, token: int) -> None:
    """Set to -100, in place, the labels of every position whose input token is `token`."""
    for ex in examples:
        ex.labels = [IGNORE_INDEX if t == token else lab for t, lab in zip(ex.input_ids, ex.labels)]


__all__ = ["has_labels", "leave_untrained", "untrained_token"]
