"""Rows → token ids and labels (the loss mask), and the whole dataset → examples with a summary.

A row is rendered to one text in which some character spans are trained (the response, each
assistant turn with its end-of-turn token); the text is tokenized once and a token is trained when
it holds a character of a trained span. Tokenizing the whole text once (not prompt and answer apart)
gives the same tokens the model sees in a whole conversation, whatever the tokenizer does at
boundaries.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fasttune.config import DataConfig
from fasttune.data.builtin import is_builtin
from fasttune.data.errors import DataError
from fasttune.data.formats import load_rows
from fasttune.data.templates import (
    PromptContract,
    alpaca_as_user_message,
    alpaca_text,
    make_contract,
    render_chat,
)
from fasttune.models.base import IGNORE_INDEX

TOKENIZE_CHUNK = 1024  # rows per tokenizer call: the Rust tokenizer works through a batch in parallel


@dataclass
class Example:
    """One tokenized row. labels[t] is input_ids[t] where trained, IGNORE_INDEX (-100) elsewhere;
    they are not shifted (packing.shift_targets does that). `row` is the row number in the file."""

    input_ids: list[int]
    labels: list[int]
    row: int | None = None

    @property
    def n_trained(self) -> int:
        """Tokens that will be predicted: position 0 has no previous token, so labels[0] never counts."""
        return sum(1 for x in self.labels[1:] if x != IGNORE_INDEX)


def _strip_end(text: str, markers: tuple[str | None, ...]) -> str:
    """A response minus a trailing EOS/end-of-turn string the data already carried, so that the
    end token appears exactly once."""
    changed = True
    while changed:
        changed = False
        stripped = text.rstrip()
        for m in markers:
            if m and stripped.endswith(m):
                text, changed = stripped[: -len(m)], True
    return text


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _mask_from_offsets(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Per token, whether it holds any character of the spans.

    A token that straddles a boundary (a template whose generation prompt ends in a space merges it
    with the answer's first word, " a1" → " a" "1") is trained: it is the answer's first token.
    Special tokens some tokenizers report as zero-width count where they start.
    """
    if not offsets:
        return []
    off = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # (n_tokens, 2): start, end
    s, e = off[:, 0], off[:, 1]
    trained = np.zeros(len(off), dtype=bool)
    for a, b in spans:
        trained |= ((s < b) & (e > a)) | ((s == e) & (s >= a) & (s < b))
    return trained.tolist()


def _mask_by_counting(text: str, spans: list[tuple[int, int]], ids: list[int], tokenizer: Any) -> list[bool]:
    """For tokenizers without offsets: compare the tokens of the prefix ending at each span boundary
    with the whole text's; where they part, a token straddles the boundary (and is trained)."""
    trained = [False] * len(ids)
    for a, b in spans:
        pre_a = list(tokenizer(text[:a], add_special_tokens=False)["input_ids"])
        pre_b = list(tokenizer(text[:b], add_special_tokens=False)["input_ids"])
        first = _common_prefix(pre_a, ids)
        shared_b = _common_prefix(pre_b, ids)
        last = shared_b if shared_b == len(pre_b) else shared_b + 1
        for t in range(first, min(last, len(ids))):
            trained[t] = True
    return trained


def _tokenize(rendered: list[Rendered], tokenizer: Any) -> list[tuple[list[int], list[bool]]]:
    """Token ids and trained flags of many rendered rows, tokenized as one batch where possible."""
    texts = [r.text for r in rendered]
    try:
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(list(ids), _mask_from_offsets(offsets, r.spans))
                for ids, offsets, r in zip(enc["input_ids"], enc["offset_mapping"], rendered)]
    except (NotImplementedError, ValueError, KeyError):
        out = []
        for r in rendered:
            ids = list(tokenizer(r.text, add_special_tokens=False)["input_ids"])
            out.append((ids, _mask_by_counting(r.text, r.spans, ids, tokenizer)))
        return out


def _chat_spans(messages: list[dict[str, Any]], contract: PromptContract, tokenizer: Any,
                tools: list[dict[str, Any]] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """The conversation's text and the character span of every assistant turn (content + end token).

    The prompt before each assistant turn is rendered on its own (with the generation prompt); where
    it is a prefix of the whole text (true of every incremental template) the search for the answer
    starts there, otherwise after the previous answer. An assistant turn with `tool_calls` is trained from
    the end of that prompt to its end-of-turn token: the template writes the calls in its own syntax, so
    the text is located by position, not searched for. Tool results (role `tool`) are context, never
    trained. `tools` and every tool call and result must show in the text: a template that ignores them is
    a DataError naming the field, never a row trained without them (tools_check.py).
    """
    from fasttune.data import tools_check

    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages = messages[: last + 1]  # trailing user turns would only add masked tokens
    markers = (contract.end_of_turn, contract.eos_token)
    messages = [dict(m, content=_strip_end(m["content"], markers)) if m["role"] == "assistant" else m
                for m in messages]
    full = render_chat(messages, contract, tokenizer, add_generation_prompt=False, tools=tools)
    if tools:
        tools_check.tools_rendered(full, render_chat(messages, contract, tokenizer, False))
    spans, inserts, cursor = [], [], 0
    for i, m in enumerate(messages):
        if m["role"] == "tool":
            cursor = tools_check.result_rendered(full, m, i, cursor)
        if m["role"] != "assistant":
            continue
        start, prefix_ok = cursor, False
        try:
            prefix = render_chat(messages[:i], contract, tokenizer, add_generation_prompt=True, tools=tools)
            if full.startswith(prefix) and len(prefix) >= cursor:
                start, prefix_ok = len(prefix), True
        except Exception:  # a template that rejects a partial conversation: search from the cursor
            pass
        if m.get("tool_calls"):
            if not prefix_ok:
                raise DataError("the chat template does not render the conversation before this "
                                "tool-calling turn as a prefix of the whole, so the turn cannot be located "
                                "for the loss mask",
                                field=f"messages[{i}].tool_calls", reason="template error")
            begin = start
            end, closed = _turn_end(messages, i, full, begin, contract, tokenizer, tools)
            tools_check.calls_rendered(full[begin:end], m["tool_calls"], i)
            if not closed:
                inserts.append(end)  # the template closes this turn with no token: EOS is added and trained
        else:
            content = m["content"].strip()
            begin = full.find(content, start)
            if begin < 0:
                raise DataError("the chat template changed this assistant turn's text, so its tokens cannot "
                                "be located for the loss mask", field="messages", reason="template error")
            end = begin + len(content)
            marker = full.find(contract.end_of_turn, end) if contract.end_of_turn else -1
            if marker >= 0 and not full[end:marker].strip():
                end = marker + len(contract.end_of_turn)
            else:
                inserts.append(end)  # the template closes this turn with no token: EOS is added and trained
        spans.append((begin, end))
        cursor = end
    # Insert EOS where needed, shifting later spans by what was inserted before them.
    text, out, shift, prev = "", [], 0, 0
    for a, b in spans:
        text += full[prev:b]
        extra = contract.eos_token if b in inserts else ""
        text += extra
        out.append((a + shift, b + shift + len(extra)))
        shift += len(extra)
        prev = b
    return text + full[prev:], out


def _turn_end(messages: list[dict[str, Any]], i: int, full: str, begin: int, contract: PromptContract,
              tokenizer: Any, tools: list[dict[str, Any]] | None) -> tuple[int, bool]:
    """Where assistant turn i, which starts at `begin` in `full`, ends, and whether that end is the
    template's end-of-turn token. The turn's text is what the conversation rendered up to it adds; a
    template that renders a partial conversation otherwise is searched for the end-of-turn token."""
    upto = render_chat(messages[: i + 1], contract, tokenizer, add_generation_prompt=False, tools=tools)
    stop = len(upto) if full.startswith(upto) and len(upto) > begin else len(full)
    if contract.end_of_turn:
        marker = full.find(contract.end_of_turn, begin, stop)
        if marker >= 0:
            return marker + len(contract.end_of_turn), True
    if stop == len(full) and not full.startswith(upto):
        raise DataError("the chat template does not render this tool-calling turn as a prefix of the whole "
                        "conversation, so its end cannot be located for the loss mask",
                        field=f"messages[{i}].tool_calls", reason="template error")
    return begin + len(full[begin:stop].rstrip()), False


@dataclass
class Rendered:
    """A row as text, the character spans to train, and whether EOS follows the text (as an id)."""

    text: str
    spans: list[tuple[int, int]]
    append_eos: bool


def render_row(row: dict[str, Any], fmt: str, tokenizer: Any, contract: PromptContract) -> Rendered:
    """One normalised row (see formats.py) as text with its trained character spans."""
    eos_markers = (contract.eos_token, contract.end_of_turn)
    if contract.template == "chat":
        tools = row.get("tools")
        if fmt == "messages":
            messages = row["messages"]
        else:
            messages = [{"role": "user", "content": alpaca_as_user_message(row["instruction"], row["input"])},
                        {"role": "assistant", "content": row["output"]}]
        try:
            text, spans = _chat_spans(messages, contract, tokenizer, tools)
        except DataError:
            raise
        except Exception as e:  # jinja errors from the template, e.g. "roles must alternate"
            raise DataError(f"the chat template rejected this conversation: {e}", field="messages",
                            reason="template error") from None
        return Rendered(text, spans, append_eos=False)
    if fmt == "alpaca":
        prompt = alpaca_text(row["instruction"], row["input"], contract)
        text = prompt + _strip_end(row["output"], eos_markers)
        return Rendered(text, [(len(prompt), len(text))], append_eos=True)
    if fmt == "text":
        text = _strip_end(row["text"], eos_markers)
        return Rendered(text, [(0, len(text))], append_eos=True)
    if fmt == "prompt_completion":  # TRL's: prompt as written, the completion (and EOS) trained
        text = row["prompt"] + _strip_end(row["completion"], eos_markers)
        return Rendered(text, [(len(row["prompt"]), len(text))], append_eos=True)
    raise DataError(f"template '{contract.template}' cannot render {fmt} rows")


def _example(r: Rendered, ids: list[int], trained: list[bool], contract: PromptContract,
             train_on_inputs: bool) -> Example:
    if r.append_eos:
        ids.append(contract.eos_id)
        trained.append(True)
    if contract.add_bos and contract.bos_id is not None and (not ids or ids[0] != contract.bos_id):
        ids.insert(0, contract.bos_id)
        trained.insert(0, False)
    labels = list(ids) if train_on_inputs else [i if t else IGNORE_INDEX for i, t in zip(ids, trained)]
    return Example(input_ids=ids, labels=labels)


def encode_rows(rendered: list[Rendered], tokenizer: Any, contract: PromptContract,
                train_on_inputs: bool = False) -> list[Example]:
    """Examples of many rendered rows; the tokenizer sees them in one batch (much faster)."""
    return [_example(r, ids, trained, contract, train_on_inputs)
            for r, (ids, trained) in zip(rendered, _tokenize(rendered, tokenizer))]


def encode_row(row: dict[str, Any], fmt: str, tokenizer: Any, contract: PromptContract,
               train_on_inputs: bool = False) -> Example:
    """Tokenize one normalised row (see formats.py) into input ids and unshifted labels.

    Worked example (alpaca, contract.add_bos False):  prompt "…### Response:\\n" + output "Hi" + EOS
        input_ids  p0   p1  …  pk   Hi   EOS
        labels    -100 -100 … -100  Hi   EOS
    """
    rendered = render_row(row, fmt, tokenizer, contract)
    (example,) = encode_rows([rendered], tokenizer, contract, train_on_inputs)
    return example


@dataclass
class DataSummary:
    """What happened to the rows of one split, for the log and `fasttune data preview`."""

    source: str
    split: str
    format: str
    template: str
    rows_read: int = 0
    rows_valid: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    dropped_long: int = 0
    dropped_untrainable: int = 0
    examples: int = 0
    tokens: int = 0
    trained_tokens: int = 0
    longest: int = 0
    chunked: int = 0  # rows split into several examples (on_long_row chunk)

    def __str__(self) -> str:
        skipped = sum(self.skipped.values())
        reasons = ", ".join(f"{k}: {v}" for k, v in sorted(self.skipped.items()))
        lines = [
            f"{self.split} data: {self.source} ({self.format} rows, template {self.template})",
            f"  rows read {self.rows_read}, valid {self.rows_valid}, skipped {skipped}"
            + (f" ({reasons})" if skipped else ""),
            f"  examples {self.examples}, truncated {self.truncated}, "
            f"dropped as too long {self.dropped_long}, "
            f"dropped with nothing trained left {self.dropped_untrainable}"
            + (f", split into chunks {self.chunked}" if self.chunked else ""),
            f"  tokens {self.tokens} ({self.trained_tokens} trained), longest example {self.longest}",
        ]
        return "\n".join(lines)


@dataclass
class TokenizedData:
    examples: list[Example]
    summary: DataSummary
    contract: PromptContract
    format: str


def eval_source(data_cfg: DataConfig) -> str | None:
    """The held-out source: eval_dataset, where 'auto' means the built-in dataset's held-out split when
    training on a built-in dataset, else none."""
    from fasttune.data.holdout import PREFIX, holdout_fraction

    fraction = holdout_fraction(data_cfg)
    if fraction is not None:  # held out of the training data (data/holdout.py)
        return f"{PREFIX}{fraction:g}"
    source = data_cfg.eval_dataset
    if source == "auto":
        train = data_cfg.dataset
        return train if isinstance(train, str) and is_builtin(train) else None  # a list: none
    return None if source in (None, "", "none") else source


def build_dataset(data_cfg: DataConfig, tokenizer: Any, max_seq_length: int, split: str = "train",
                  contract: PromptContract | None = None) -> TokenizedData | None:
    """Read, validate and tokenize one split. split='eval' reads `eval_source(data_cfg)` (None → None).

    Pass the training run's `contract` for the eval split so both render alike. Raises DataError when
    no example has a trained token ("all labels are masked"), before any training starts.
    """
    source = data_cfg.dataset if split == "train" else eval_source(data_cfg)
    if source is None:
        return None
    valid = load_rows(source, data_cfg, split=None if split == "train" else "eval")
    if not valid.rows:
        raise DataError(f"no usable rows in {source} ({valid.read} read"
                        + (f", skipped: {dict(valid.skipped)}" if valid.skipped else "") + ")")
    contract = contract or make_contract(data_cfg.template, valid.format, tokenizer)
    summary = DataSummary(source=source, split=split, format=valid.format, template=contract.template,
                          rows_read=valid.read, rows_valid=len(valid.rows))
    skipped: Counter[str] = Counter(valid.skipped)
    rendered, numbers = [], []
    for number, row in valid.rows:
        try:
            rendered.append(render_row(row, valid.format, tokenizer, contract))
            numbers.append(number)
        except DataError as e:
            if data_cfg.on_bad_row != "skip":
                raise e.at(file=source, row=number) from None
            skipped[e.reason] += 1
    if data_cfg.on_long_row == "chunk" and valid.format != "text":
        raise DataError(f"on_long_row chunk: splits text rows (continued pretraining); the {valid.format} "
                        f"rows of {source} have a prompt and a response, so use truncate or drop")
    examples = []
    for start in range(0, len(rendered), TOKENIZE_CHUNK):
        stop = start + TOKENIZE_CHUNK
        chunk = encode_rows(rendered[start:stop], tokenizer, contract, data_cfg.train_on_inputs)
        for number, ex in zip(numbers[start:stop], chunk):
            ex.row = number
            if len(ex.input_ids) > max_seq_length:
                if data_cfg.on_long_row == "chunk":
                    from fasttune.data.chunking import chunk_example

                    summary.chunked += 1
                    examples.extend(chunk_example(ex, max_seq_length))
                    continue
                if data_cfg.on_long_row == "drop":
                    summary.dropped_long += 1
                    continue
                ex.input_ids, ex.labels = ex.input_ids[:max_seq_length], ex.labels[:max_seq_length]
                summary.truncated += 1
                if ex.n_trained == 0:
                    summary.dropped_untrainable += 1
                    continue
            examples.append(ex)
    summary.skipped = dict(skipped)
    summary.examples = len(examples)
    summary.tokens = sum(len(e.input_ids) for e in examples)
    summary.trained_tokens = sum(e.n_trained for e in examples)
    summary.longest = max((len(e.input_ids) for e in examples), default=0)
    if summary.trained_tokens == 0:
        why = []
        if summary.dropped_untrainable:
            why.append(f"{summary.dropped_untrainable} rows lost every trained token to max_seq_length="
                       f"{max_seq_length} (raise it, or shorten the prompts)")
        if summary.dropped_long:
            why.append(f"{summary.dropped_long} rows were longer than max_seq_length={max_seq_length} and "
                       "on_long_row is drop")
        if sum(skipped.values()):
            why.append(f"skipped rows: {dict(skipped)}")
        raise DataError(f"all labels are masked: nothing to train in {source} ({split})"
                        + (": " + "; ".join(why) if why else ""))
    return TokenizedData(examples=examples, summary=summary, contract=contract, format=valid.format)
