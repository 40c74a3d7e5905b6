"""Rows of the preference and RL methods, in TRL's dataset formats: validate, render, tokenize.

    preference  {"prompt": P, "chosen": C, "rejected": R}          dpo, orpo
    unpaired    {"prompt": P, "completion": C, "label": bool}      kto
    prompt      {"prompt": P, ...other columns}                    grpo (other columns go to the rewards)

P is a string or a conversation (a list of role/content messages); C and R are then a string or a list of
assistant messages. A conversational row is rendered with the chat template: the completion is everything
the template writes after the prompt's generation prompt. A plain row is rendered with the run's template:
'alpaca' (the default) puts the prompt in the Alpaca instruction, 'chat' makes it one user turn, and
'text' is TRL's plain convention, the prompt text followed directly by the completion. EOS is
appended to a plain completion (once). Only completion tokens are trained, as in SFT's loss mask.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fasttune.config import DataConfig
from fasttune.data.errors import DataError
from fasttune.data.formats import ROLES, _short
from fasttune.data.sources import read_rows
from fasttune.data.templates import PromptContract, alpaca_text, encode_prompt, make_contract, render_chat
from fasttune.data.tokenize import DataSummary, Example, Rendered, _strip_end, encode_rows
from fasttune.models.base import IGNORE_INDEX

# method -> the row format it reads, and that format's required columns
METHOD_FORMAT = {"dpo": "preference", "orpo": "preference", "kto": "unpaired", "grpo": "prompt"}
COLUMNS = {"preference": ("prompt", "chosen", "rejected"), "unpaired": ("prompt", "completion", "label"),
           "prompt": ("prompt",)}


def _messages(value: Any, where: str, *, assistant_only: bool = False) -> list[dict[str, str]]:
    if not value:
        raise DataError("empty conversation", field=where, reason="empty field")
    out = []
    for i, turn in enumerate(value):
        at = f"{where}[{i}]"
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise DataError(f"expected a message with role and content, found {_short(turn)}", field=at,
                            reason="wrong type")
        role = ROLES.get(str(turn.get("role", "")).lower())
        if role is None or role == "tool":  # tool-calling rows are SFT messages rows
            raise DataError(f"unknown role {turn.get('role')!r} (known: system, user, assistant)",
                            field=f"{at}.role", reason="unknown role")
        if assistant_only and role != "assistant":
            raise DataError(f"a completion holds assistant messages only, found role {role!r}",
                            field=f"{at}.role", reason="unknown role")
        out.append({"role": role, "content": turn["content"]})
    return out


def _text_or_messages(row: dict[str, Any], key: str, conversational: bool | None,
                      completion: bool) -> str | list[dict[str, str]]:
    value = row.get(key)
    if value is None:
        raise DataError("missing", field=key, reason="missing field")
    if isinstance(value, str):
        if conversational:
            raise DataError("a string, but the prompt is a conversation: give a list of assistant messages",
                            field=key, reason="wrong type")
        if not value.strip() and completion:
            raise DataError("empty string", field=key, reason=f"empty {key}")
        return value
    if isinstance(value, list):
        if conversational is False:
            raise DataError("a list of messages, but the prompt is a string", field=key, reason="wrong type")
        return _messages(value, key, assistant_only=completion)
    raise DataError(f"expected a string or a list of messages, found {type(value).__name__} {_short(value)}",
                    field=key, reason="wrong type")


def normalise(row: dict[str, Any], fmt: str) -> dict[str, Any]:
    """The row with its TRL columns checked (file and row are added by the caller)."""
    prompt = _text_or_messages(row, "prompt", None, completion=False)
    conversational = isinstance(prompt, list)
    out = dict(row, prompt=prompt)
    if fmt == "preference":
        for key in ("chosen", "rejected"):
            out[key] = _text_or_messages(row, key, conversational, completion=True)
    elif fmt == "unpaired":
        out["completion"] = _text_or_messages(row, "completion", conversational, completion=True)
        if not isinstance(row.get("label"), bool):
            raise DataError(f"expected true or false, found {_short(row.get('label'))}", field="label",
                            reason="missing field" if row.get("label") is None else "wrong type")
    return out


def render_completion(prompt: str | list[dict[str, str]], completion: str | list[dict[str, str]],
                      contract: PromptContract, tokenizer: Any) -> Rendered:
    """prompt + completion as one text, the completion's characters as the trained span."""
    if isinstance(prompt, list) or contract.template == "chat":
        if contract.template != "chat":
            raise DataError("conversational rows need the chat template (this run's is "
                            f"'{contract.template}')", field="prompt", reason="template error")
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        done = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        try:
            head = render_chat(msgs, contract, tokenizer, add_generation_prompt=True)
            text = render_chat(msgs + done, contract, tokenizer, add_generation_prompt=False)
        except Exception as e:  # jinja errors from the template
            raise DataError(f"the chat template rejected this conversation: {e}", field="prompt",
                            reason="template error") from None
        if not text.startswith(head):
            raise DataError("the chat template renders the prompt differently inside the whole "
                            "conversation, so the completion cannot be located", field="prompt",
                            reason="template error")
        return Rendered(text, [(len(head), len(text))], append_eos=False)
    head = alpaca_text(prompt, "", contract) if contract.template == "alpaca" else prompt
    text = head + _strip_end(completion, (contract.eos_token, contract.end_of_turn))
    return Rendered(text, [(len(head), len(text))], append_eos=True)


def prompt_text(prompt: str | list[dict[str, str]], contract: PromptContract, tokenizer: Any) -> str:
    """The generation-time text of a prompt (GRPO samples its completions after it)."""
    if isinstance(prompt, list) or contract.template == "chat":
        msgs = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        return render_chat(msgs, contract, tokenizer, add_generation_prompt=True)
    return alpaca_text(prompt, "", contract) if contract.template == "alpaca" else prompt


@dataclass
class PairExample:
    chosen: Example
    rejected: Example
    row: int | None = None


@dataclass
class UnpairedExample:
    example: Example
    label: bool
    row: int | None = None


@dataclass
class PromptExample:
    prompt_ids: list[int]
    row_data: dict[str, Any]  # the normalised row: the prompt and every other column, for reward functions
    row: int | None = None


@dataclass
class MethodData:
    examples: list[Any]
    summary: DataSummary
    contract: PromptContract
    format: str


def method_contract(template: str, prompt: Any, tokenizer: Any) -> PromptContract:
    """The prompt contract for rows whose first prompt is `prompt` (conversational -> the chat template)."""
    if isinstance(prompt, list):
        return make_contract("chat", "messages", tokenizer)
    if template == "text":
        return make_contract("auto", "text", tokenizer)
    return make_contract(template, "alpaca", tokenizer)


def _truncate(ex: Example, max_len: int, summary: DataSummary, on_long_row: str) -> Example | None:
    """Keep the start of a long sequence (TRL's keep_start), or drop it; None when nothing trained is left."""
    if len(ex.input_ids) <= max_len:
        return ex
    if on_long_row == "drop":
        summary.dropped_long += 1
        return None
    summary.truncated += 1
    ex = Example(ex.input_ids[:max_len], ex.labels[:max_len], ex.row)
    if ex.n_trained == 0:
        summary.dropped_untrainable += 1
        return None
    return ex


def cut(ex: Example, max_prompt_length: int | None, max_completion_length: int | None) -> Example:
    """The prompt's last `max_prompt_length` tokens and the completion's first `max_completion_length` (the
    completion starts at the first trained token), as TRL before 1.0 cut them."""
    start = next((i for i, lab in enumerate(ex.labels) if lab != IGNORE_INDEX), len(ex.labels))
    keep_from = 0 if max_prompt_length is None else max(0, start - max_prompt_length)
    end = len(ex.input_ids) if max_completion_length is None else start + max_completion_length
    return Example(ex.input_ids[keep_from:end], ex.labels[keep_from:end], ex.row)


def build_method_data(data_cfg: DataConfig, method: str, tokenizer: Any, max_seq_length: int,
                      split: str = "train", contract: PromptContract | None = None,
                      source: str | None = None, rows_in: Iterable[tuple[int, Any]] | None = None,
                      max_prompt_length: int | None = None,
                      max_completion_length: int | None = None) -> MethodData:
    """Read, validate and tokenize one split of a dpo/orpo/kto/grpo dataset (the prompt-only rows of grpo
    keep their prompt ids alone). `contract`: an earlier run's or the train split's, else made from the
    data. `rows_in`: (row number, row) in place of reading `source` (which then only names them).
    `max_prompt_length` / `max_completion_length`: `cut` each sequence (prompts alone, for grpo) before
    max_seq_length applies."""
    fmt = METHOD_FORMAT[method]
    source = source or data_cfg.dataset
    rows, read, skipped = [], 0, Counter()
    if rows_in is None:
        rows_in = read_rows(source, None if split == "train" else "eval")
    for number, raw in rows_in:
        read += 1
        try:
            if isinstance(raw, DataError):
                raise raw
            rows.append((number, normalise(raw, fmt)))
        except DataError as e:
            if data_cfg.on_bad_row != "skip":
                raise e.at(file=source, row=number) from None
            skipped[e.reason] += 1
        if data_cfg.max_rows is not None and len(rows) >= data_cfg.max_rows:
            break
    if not rows:
        raise DataError(f"no usable {fmt} rows in {source} ({read} read"
                        + (f", skipped: {dict(skipped)}" if skipped else "")
                        + f"); {method} reads the columns {', '.join(COLUMNS[fmt])}")
    contract = contract or method_contract(data_cfg.template, rows[0][1]["prompt"], tokenizer)
    summary = DataSummary(source=source, split=split, format=fmt, template=contract.template, rows_read=read,
                          rows_valid=len(rows))
    keys = {"preference": ("chosen", "rejected"), "unpaired": ("completion",), "prompt": ()}[fmt]
    rendered, numbers = [], []
    for number, row in rows:
        try:
            if fmt == "prompt":
                rendered.append(prompt_text(row["prompt"], contract, tokenizer))
            else:
                rendered.extend(render_completion(row["prompt"], row[k], contract, tokenizer) for k in keys)
            numbers.append((number, row))
        except DataError as e:
            if data_cfg.on_bad_row != "skip":
                raise e.at(file=source, row=number) from None
            skipped[e.reason] += 1
    examples: list[Any] = []
    if fmt == "prompt":
        for text, (number, row) in zip(rendered, numbers):
            ids = encode_prompt(text, contract, tokenizer)
            if max_prompt_length is not None:
                ids = ids[-max_prompt_length:]
            if len(ids) >= max_seq_length:
                summary.dropped_long += 1
                continue
            examples.append(PromptExample(ids, row, number))
        summary.tokens = sum(len(e.prompt_ids) for e in examples)
    else:
        encoded = encode_rows(rendered, tokenizer, contract, data_cfg.train_on_inputs)
        per_row = len(keys)
        for k, (number, row) in enumerate(numbers):
            group = [_truncate(cut(Example(e.input_ids, e.labels, number), max_prompt_length,
                                   max_completion_length), max_seq_length, summary, data_cfg.on_long_row)
                     for e in encoded[k * per_row:(k + 1) * per_row]]
            if any(e is None for e in group):
                continue
            examples.append(PairExample(group[0], group[1], number) if fmt == "preference"
                            else UnpairedExample(group[0], bool(row["label"]), number))
        parts = [e for x in examples
                 for e in ((x.chosen, x.rejected) if fmt == "preference" else (x.example,))]
        summary.tokens = sum(len(e.input_ids) for e in parts)
        summary.trained_tokens = sum(e.n_trained for e in parts)
        summary.longest = max((len(e.input_ids) for e in parts), default=0)
    summary.skipped = dict(skipped)
    summary.examples = len(examples)
    if not examples:
        raise DataError(f"nothing to train in {source} ({split}): every row was skipped or longer than "
                        f"max_seq_length={max_seq_length}")
    return MethodData(examples, summary, contract, fmt)
