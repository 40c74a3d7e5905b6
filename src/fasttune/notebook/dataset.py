"""TRL's SFTTrainer dataset preparation: which column of a row is trained, and how, as token ids and labels.

A row is read in TRL's order:
 1. rows already tokenized (`input_ids`, optional `labels`): used as they are;
 2. `formatting_func`: the text it returns for the row (or, called on a batch of columns, one text per row);
 3. `prompt` + `completion` strings: joined, the completion trained (`completion_only_loss`, default on);
 4. conversations (`messages`, or ShareGPT `conversations` of `from`/`value` turns, which TRL renames to
    `messages`): the chat template's rendering of the whole conversation, every token trained
    (`assistant_only_loss`: the assistant turns only). `conversations` of `role`/`content` turns beside
    the text column are not read (TRL reads the text); without a text column fasttune renders them;
 5. the `dataset_text_field` column (default "text"), whatever other columns the row has;
 6. fasttune's addition: Alpaca rows (instruction/input/output) without that column are rendered with the
    Stanford Alpaca prompt and trained on the response, with a warning saying so (TRL stops there).
A text gets the EOS string appended unless it already ends with it (TRL's `add_eos`) and is tokenized as
the tokenizer does by default (with BOS where it adds one). Every token is a label; position 0 has no
previous token, so it is never a target. Examples longer than `max_length` keep their start; those left
with no trained token are dropped.

Worked example, text "Q: hi A: yo", SmolLM2's tokenizer (adds no BOS), eos "<|im_end|>":
    input_ids  Q   :   hi   A   :   yo  <|im_end|>
    labels     Q   :   hi   A   :   yo  <|im_end|>        (all of it; targets are shifted by the loop)
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from fasttune.config import DataConfig
from fasttune.data.errors import DataError
from fasttune.data.tokenize import Example
from fasttune.models.base import IGNORE_INDEX

DATASET_KWARGS = ("skip_prepare_dataset", "add_special_tokens")


@dataclass
class TextOptions:
    """The SFTTrainer / SFTConfig settings that decide what is trained."""

    text_field: str = "text"
    eos_token: str | None = None  # None: the tokenizer's
    add_special_tokens: bool = True
    skip_prepare: bool = False
    max_length: int | None = 1024
    completion_only_loss: bool | None = None
    assistant_only_loss: bool = False


class Prepared(Sequence):
    """A prepared dataset, as TRL leaves `trainer.train_dataset`: rows of `input_ids` and `labels`
    (labels unshifted, -100 where not trained). `kind` says which column was read."""

    column_names = ["input_ids", "labels"]

    def __init__(self, examples: list[Example], kind: str, contract: Any) -> None:
        self.examples, self.kind, self.contract = examples, kind, contract

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, list[int]]:  # type: ignore[override]
        ex = self.examples[i]
        return {"input_ids": list(ex.input_ids), "labels": list(ex.labels)}


def dataset_rows(dataset: Any, name: str, trainer: str = "SFTTrainer") -> list[dict[str, Any]]:
    """The rows of a datasets.Dataset or a list of mappings."""
    if dataset is None:
        raise ValueError(f"{trainer}: {name} is required")
    if isinstance(dataset, dict) and all(isinstance(v, list) for v in dataset.values()):
        raise TypeError(f"{trainer}: {name} is a dict of columns; pass a datasets.Dataset or a list of rows")
    rows = list(dataset)
    if isinstance(dataset, list | tuple) and any(hasattr(r, "column_names") for r in rows):
        raise TypeError(f"SFTTrainer: {name} is a list of datasets; pass one, as TRL's SFTTrainer takes "
                        "(datasets.interleave_datasets(..., probabilities=, seed=) or concatenate_datasets "
                        "mixes several; fasttune train mixes a dataset list with weights)")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"expected a mapping of column names to values, got {type(row).__name__}",
                            file=name, row=i + 1)
    return rows


def formatted_texts(rows: list[dict[str, Any]], func: Callable, name: str) -> list[str]:
    """`formatting_func` applied per row returning a string (TRL today), or on a batch of columns
    returning a list with one string per row (older TRL, and many notebooks)."""
    if not rows:
        return []
    first = func(rows[0])
    if isinstance(first, str):
        texts = [first] + [func(r) for r in rows[1:]]
    else:
        texts = func({k: [r.get(k) for r in rows] for k in rows[0]})
        if isinstance(texts, dict) and "text" in texts:
            texts = texts["text"]
        if not isinstance(texts, list) or len(texts) != len(rows):
            raise ValueError("SFTTrainer: formatting_func must return a string per row (or, called on a "
                             "batch of columns, a list with one string per row)")
    for i, t in enumerate(texts):
        if not isinstance(t, str) or not t:
            raise DataError(f"formatting_func returned {type(t).__name__} {str(t)[:30]!r}, not a text",
                            file=name, row=i + 1)
    return texts


def _from_value(turns: list) -> bool:
    """ShareGPT turns (`from`/`value`), which TRL renames to a `messages` column; `conversations` of
    `role`/`content` turns are no conversation to TRL, which then reads the text column."""
    return bool(turns) and isinstance(turns[0], dict) and "from" in turns[0] and "value" in turns[0]


def _kind(row: dict[str, Any], opts: TextOptions) -> str | None:
    if "input_ids" in row:
        return "tokenized"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    if isinstance(row.get("messages"), list):
        return "messages"
    turns = row.get("conversations")
    if isinstance(turns, list) and (_from_value(turns) or opts.text_field not in row):
        return "messages"
    if opts.text_field in row:
        return "text"
    if "instruction" in row and "output" in row:
        return "alpaca"
    return None


def _with_eos(text: str, eos: str) -> str:
    return text if text.endswith(eos) else text + eos


def _strings(rows: list[dict[str, Any]], key: str, name: str) -> list[str]:
    out = []
    for i, row in enumerate(rows):
        value = row.get(key)
        if not isinstance(value, str):
            why = "missing" if value is None else f"expected a string, found {type(value).__name__}"
            raise DataError(why, file=name, row=i + 1, field=key)
        out.append(value)
    return out


def _ids(tokenizer: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    return [list(x) for x in tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]]


def _text_examples(texts: list[str], tokenizer: Any, opts: TextOptions, eos: str) -> list[Example]:
    ids = _ids(tokenizer, [_with_eos(t, eos) for t in texts], opts.add_special_tokens)
    bos = getattr(tokenizer, "bos_token_id", None)
    doubled = sum(1 for x in ids if bos is not None and x[:2] == [bos, bos]) if opts.add_special_tokens else 0
    if doubled:  # a chat template's rendering that begins with BOS, tokenized by a tokenizer that adds one
        warnings.warn(
            f"SFTTrainer: {doubled} of {len(ids)} texts begin with the BOS token {tokenizer.bos_token!r} and "
            "the tokenizer adds another: they train with two, as TRL's SFTTrainer does (Unsloth's adds none "
            "then). SFTConfig(dataset_kwargs={'add_special_tokens': False}) trains each text as written",
            UserWarning, stacklevel=4)
    return [Example(input_ids=x, labels=list(x)) for x in ids]


def _prompt_completion_examples(rows: list[dict[str, Any]], tokenizer: Any, opts: TextOptions, eos: str,
                                name: str) -> list[Example]:
    """TRL's prompt-completion rows: the completion starts where the tokens of the prompt alone and of
    prompt + completion part (usually the prompt's end); with completion_only_loss (None or True) only
    from there is trained."""
    if not isinstance(rows[0]["prompt"], str):
        raise DataError("conversational prompt/completion rows are not supported; give `messages` rows "
                        "or prompt and completion strings", file=name, row=1, field="prompt")
    prompts, completions = _strings(rows, "prompt", name), _strings(rows, "completion", name)
    prompt_ids = _ids(tokenizer, prompts, opts.add_special_tokens)
    full_ids = _ids(tokenizer, [p + _with_eos(c, eos) for p, c in zip(prompts, completions)],
                    opts.add_special_tokens)
    masked = opts.completion_only_loss is not False
    out = []
    for p, x in zip(prompt_ids, full_ids):
        n = 0
        while n < min(len(p), len(x)) and p[n] == x[n]:
            n += 1
        labels = [IGNORE_INDEX] * n + x[n:] if masked else list(x)
        out.append(Example(input_ids=x, labels=labels))
    return out


def _message_examples(rows: list[dict[str, Any]], tokenizer: Any, opts: TextOptions, contract: Any,
                      name: str) -> list[Example]:
    """The whole conversation as the chat template renders it (TRL's apply_chat_template, with the row's
    `tools` column; ShareGPT turns as TRL converts them, `from`/`value` renamed, the role names kept), or
    with assistant_only_loss the assistant turns only (fasttune finds their spans; any template works). A
    row with tool parts the template does not write is refused (data/tools_check.py)."""
    from fasttune.data.formats import normalise_row
    from fasttune.data.tokenize import encode_row, render_row

    cfg = DataConfig()
    out = []
    for i, row in enumerate(rows):
        if "chat_template_kwargs" in row:
            raise DataError("the chat_template_kwargs column is not supported", file=name, row=i + 1)
        turns = row.get("conversations") if "messages" not in row else None
        sharegpt = isinstance(turns, list) and _from_value(turns)
        try:
            if sharegpt and opts.assistant_only_loss:
                raise DataError("ShareGPT turns keep their role names under TRL (from: human, gpt), which a "
                                "chat template does not mark as assistant turns: with assistant_only_loss "
                                "nothing would be trained; map them to user/assistant first (Unsloth's "
                                "standardize_sharegpt)", field="conversations")
            normal = normalise_row(row, "messages", cfg)
            if opts.assistant_only_loss:
                out.append(encode_row(normal, "messages", tokenizer, contract))
                continue
            messages, tools = normal["messages"], normal.get("tools")
            if sharegpt:  # TRL renames the keys only: the template sees the roles as written (human, gpt)
                messages = [{("role" if k == "from" else "content" if k == "value" else k): v
                             for k, v in turn.items()} for turn in turns]
            if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
                render_row(normal, "messages", tokenizer, contract)  # the checks that the tool parts show
            ids = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True,
                                                return_dict=True)["input_ids"]
        except DataError as e:
            raise e.at(file=name, row=i + 1) from None
        out.append(Example(input_ids=list(ids), labels=list(ids)))
    return out


def _tokenized_examples(rows: list[dict[str, Any]], name: str) -> list[Example]:
    out = []
    for i, row in enumerate(rows):
        extra = sorted(k for k in ("completion_mask", "assistant_masks") if k in row)
        if extra:
            raise DataError(f"pre-tokenized rows with {', '.join(extra)} are not supported; give `labels` "
                            "(-100 where not trained)", file=name, row=i + 1)
        ids = [int(t) for t in row["input_ids"]]
        labels = [int(t) for t in row.get("labels", ids)]
        if len(labels) != len(ids):
            raise DataError(f"labels has {len(labels)} entries for {len(ids)} input_ids", file=name,
                            row=i + 1, field="labels")
        out.append(Example(input_ids=ids, labels=labels))
    return out


def _alpaca_examples(rows: list[dict[str, Any]], tokenizer: Any, contract: Any, name: str,
                     text_field: str) -> list[Example]:
    from fasttune.data.formats import normalise_row
    from fasttune.data.tokenize import encode_row

    warnings.warn(
        f"SFTTrainer: {name} has instruction/output columns but no '{text_field}' column "
        "(dataset_text_field): training on the Stanford Alpaca prompt, response only. To train on your "
        "own text, add that column (dataset.map) or pass formatting_func",
        UserWarning, stacklevel=4)
    cfg, out = DataConfig(), []
    for i, row in enumerate(rows):
        try:
            out.append(encode_row(normalise_row(row, "alpaca", cfg), "alpaca", tokenizer, contract))
        except DataError as e:
            raise e.at(file=name, row=i + 1) from None
    return out


def _check(kind: str, opts: TextOptions, formatting: bool) -> None:
    """TRL's refusals, in its words where it has them."""
    if formatting and opts.completion_only_loss:
        raise ValueError("SFTTrainer: completion_only_loss=True with a formatting_func: the formatted rows "
                         "are whole texts with no completion part; format the dataset first, or unset it")
    if opts.completion_only_loss and kind in ("text", "messages"):
        raise ValueError("SFTTrainer: completion_only_loss=True is not supported for language modeling "
                         f"({kind}) rows; it needs prompt/completion columns")
    if opts.assistant_only_loss and kind != "messages":
        raise ValueError("SFTTrainer: assistant_only_loss=True needs conversational (messages) rows; this "
                         f"dataset has {kind} rows")
    if opts.skip_prepare and kind != "tokenized":
        raise ValueError("SFTTrainer: dataset_kwargs skip_prepare_dataset=True needs rows with input_ids")


def prepare(dataset: Any, name: str, tokenizer: Any, opts: TextOptions,
            formatting_func: Callable | None = None, contract: Any = None) -> Prepared:
    """`dataset` tokenized as TRL's SFTTrainer tokenizes it (see the module docstring). `contract`: the
    training split's, for the eval split."""
    from fasttune.data.templates import make_contract

    rows = dataset_rows(dataset, name)
    if not rows:
        raise DataError(f"{name} has no rows")
    eos = opts.eos_token or tokenizer.eos_token
    if not eos:
        raise DataError("the tokenizer has no EOS token; set tokenizer.eos_token or SFTConfig(eos_token=...)")
    if formatting_func is not None and "input_ids" not in rows[0]:
        texts, kind = formatted_texts(rows, formatting_func, name), "text"
    else:
        kind = _kind(rows[0], opts)
        if kind is None:
            raise DataError(f"no '{opts.text_field}' column (dataset_text_field), no messages and no "
                            f"prompt/completion columns; columns are {sorted(rows[0])}. Add a text column "
                            "(dataset.map) or pass formatting_func", file=name, row=1)
        texts = _strings(rows, opts.text_field, name) if kind == "text" else None
    _check(kind, opts, formatting_func is not None)
    if contract is None:
        fmt = {"messages": "messages", "alpaca": "alpaca"}.get(kind, "text")
        contract = make_contract("auto", fmt, tokenizer)
        if fmt == "text":
            contract.add_bos = contract.add_bos and opts.add_special_tokens
            if eos != contract.eos_token:  # SFTConfig(eos_token=...): generation stops there too
                contract.eos_token, contract.eos_id = eos, int(tokenizer.convert_tokens_to_ids(eos))
                contract.stop_strings = [eos]
    if kind == "text":
        examples = _text_examples(texts, tokenizer, opts, eos)
    elif kind == "prompt_completion":
        examples = _prompt_completion_examples(rows, tokenizer, opts, eos, name)
    elif kind == "messages":
        examples = _message_examples(rows, tokenizer, opts, contract, name)
    elif kind == "tokenized":
        examples = _tokenized_examples(rows, name)
    else:
        examples = _alpaca_examples(rows, tokenizer, contract, name, opts.text_field)
    for i, ex in enumerate(examples):
        ex.row = i + 1
    return Prepared(truncated(examples, opts.max_length if not opts.skip_prepare else None, name), kind,
                    contract)


def truncated(examples: list[Example], max_length: int | None, name: str) -> list[Example]:
    """Examples cut to max_length (keeping the start), without those left with nothing trained."""
    out = []
    for ex in examples:
        if max_length is not None:
            ex.input_ids, ex.labels = ex.input_ids[:max_length], ex.labels[:max_length]
        if ex.n_trained:
            out.append(ex)
    if not out:
        raise DataError(f"all labels are masked: nothing to train in {name}"
                        + (f" with max_length={max_length}" if max_length is not None else ""))
    return out
