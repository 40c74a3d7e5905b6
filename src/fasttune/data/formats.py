"""Row formats: detect alpaca / messages / text / prompt_completion, validate every row, normalise it.

Normalised rows are plain dicts, whatever the column names in the file were:
    alpaca      {"instruction": str, "input": str, "output": str}        (input "" when absent)
    messages    {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...],
                 "tools": [function spec, ...]}                          (tools only when the row has some)
    text        {"text": str}                                            (plain text, every token trained)
    prompt_completion  {"prompt": str, "completion": str}                  (TRL's: the completion trained)
ShareGPT rows (`conversations` of {from: human/gpt/system, value}) become messages rows.

Tool calling, as in TRL and transformers' apply_chat_template: a row's `tools` column is a list of
JSON-schema function specs (or that list as a JSON string), an assistant message may carry `tool_calls`
(its content may then be empty), and a `tool` message holds a call's result (`content`, with `name` and
`tool_call_id` kept where given). Worked example:
    {"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}],
     "messages": [{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": "", "tool_calls": [{"type": "function",
                      "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
                  {"role": "tool", "name": "get_weather", "content": "18 C"},
                  {"role": "assistant", "content": "It is 18 C in Paris."}]}
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from fasttune.config import DataConfig
from fasttune.data.errors import DataError
from fasttune.data.sources import read_rows

FORMATS = ("alpaca", "messages", "text", "prompt_completion")
TEXT_FIELD_DEFAULT = DataConfig.text_field
SHAREGPT_FIELD = "conversations"
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
         "human": "user", "gpt": "assistant"}  # ShareGPT names on the right of the first four
TOOLS_FIELD = "tools"  # TRL's column name for a row's function specs


def detect_format(row: dict[str, Any], cfg: DataConfig) -> str | None:
    """The format a row's keys say, or None when they match none. A text_field set away from its default
    names the column to train, so it wins over Alpaca columns in the same row (as dataset_text_field
    does in TRL); with the default name, a row with Alpaca columns is an Alpaca row."""
    if cfg.text_field != TEXT_FIELD_DEFAULT and cfg.text_field in row:
        return "text"
    if cfg.instruction_field in row and cfg.output_field in row:
        return "alpaca"
    if cfg.messages_field in row or SHAREGPT_FIELD in row:
        return "messages"
    if "prompt" in row and "completion" in row:  # TRL's prompt-completion rows
        return "prompt_completion"
    if cfg.text_field in row:
        return "text"
    return None


def _string(row: dict[str, Any], key: str, *, required: bool, nonempty: bool) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise DataError("missing", field=key, reason="missing field")
        return ""
    if not isinstance(value, str):
        raise DataError(f"expected a string, found {type(value).__name__} {_short(value)}", field=key,
                        reason="wrong type")
    if nonempty and not value.strip():
        raise DataError("empty string", field=key, reason=f"empty {key}")
    return value


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    # OpenAI content parts: [{"type": "text", "text": "..."}]; only text parts make sense here.
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)
    if value is None:
        raise DataError("missing", field=where, reason="missing field")
    raise DataError(f"expected a string, found {type(value).__name__} {_short(value)}", field=where,
                    reason="wrong type")


def _function(item: Any, where: str, what: str) -> dict[str, Any]:
    """The function part of a tool spec or tool call ({"function": {...}} or the bare {...}), with a name."""
    if not isinstance(item, dict):
        raise DataError(f"expected an object ({what}), found {type(item).__name__} {_short(item)}",
                        field=where, reason="wrong type")
    fn = item.get("function", item)
    if not isinstance(fn, dict):
        raise DataError(f"expected an object, found {type(fn).__name__} {_short(fn)}",
                        field=f"{where}.function", reason="wrong type")
    name = fn.get("name")
    if not isinstance(name, str) or not name.strip():
        field = f"{where}.function.name" if "function" in item else f"{where}.name"
        raise DataError(f"a {what} needs a function name, found {_short(name)}", field=field,
                        reason="missing field")
    return fn


def _tools(row: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The row's tool specs: a list of objects, or that list as a JSON string (as Arrow tables often hold it);
    None when the row has none."""
    value = row.get(TOOLS_FIELD)
    if isinstance(value, str):
        if not value.strip():
            return None
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise DataError(f"a JSON string that does not parse: {e.msg} at character {e.pos}",
                            field=TOOLS_FIELD, reason="wrong type") from None
    if value is None or value == []:
        return None
    if not isinstance(value, list):
        raise DataError(f"expected a list of function specs, found {type(value).__name__} {_short(value)}",
                        field=TOOLS_FIELD, reason="wrong type")
    for i, spec in enumerate(value):
        _function(spec, f"{TOOLS_FIELD}[{i}]", "function spec")
    return value


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise DataError(f"expected a non-empty list of tool calls, found {_short(value)}", field=where,
                        reason="wrong type")
    for i, call in enumerate(value):
        fn = _function(call, f"{where}[{i}]", "tool call")
        if not isinstance(fn.get("arguments"), dict | str):
            field = f"{where}[{i}]" + (".function" if "function" in call else "") + ".arguments"
            raise DataError(f"expected the call's arguments as an object or a JSON string, found "
                            f"{_short(fn.get('arguments'))}", field=field, reason="wrong type")
    return value


def _messages(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, Any]]:
    key = cfg.messages_field if cfg.messages_field in row else SHAREGPT_FIELD
    turns = row.get(key)
    if turns is None:
        raise DataError("missing", field=cfg.messages_field, reason="missing field")
    if not isinstance(turns, list):
        raise DataError(f"expected a list of messages, found {type(turns).__name__}", field=key,
                        reason="wrong type")
    out = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"expected an object, found {type(turn).__name__}", field=where,
                            reason="wrong type")
        role_key, content_key = ("role", "content") if "role" in turn else ("from", "value")
        role = turn.get(role_key)
        if role is None:
            raise DataError("missing 'role' (or ShareGPT 'from')", field=where, reason="missing field")
        if not isinstance(role, str) or role.lower() not in ROLES:
            raise DataError(f"unknown role {role!r} (known: system, user, assistant, tool; ShareGPT human, "
                            "gpt)", field=f"{where}.{role_key}", reason="unknown role")
        role = ROLES[role.lower()]
        calls = turn.get("tool_calls")
        if calls is not None and calls != []:
            if role != "assistant":
                raise DataError(f"only assistant turns make tool calls, this one is {role!r}",
                                field=f"{where}.tool_calls", reason="wrong role")
            # a turn that only calls tools may have no text (OpenAI writes null): it renders as empty text
            text = turn.get(content_key)
            content = "" if text is None else _content(text, f"{where}.{content_key}")
            calls = _tool_calls(calls, f"{where}.tool_calls")
            out.append({"role": role, "content": content, "tool_calls": calls})
            continue
        content = _content(turn.get(content_key), f"{where}.{content_key}")
        if role == "assistant" and not content.strip():
            raise DataError("empty string", field=f"{where}.{content_key}", reason="empty assistant turn")
        message: dict[str, Any] = {"role": role, "content": content}
        if role == "tool":
            for key in ("name", "tool_call_id"):
                value = turn.get(key)
                if value is not None and not isinstance(value, str):
                    raise DataError(f"expected a string, found {type(value).__name__} {_short(value)}",
                                    field=f"{where}.{key}", reason="wrong type")
                if value is not None:
                    message[key] = value
        out.append(message)
    if not any(t["role"] == "assistant" for t in out):
        raise DataError("no assistant turn: nothing to train on", field=key, reason="no assistant turn")
    return out


def normalise_row(row: dict[str, Any], fmt: str, cfg: DataConfig) -> dict[str, Any]:
    """The normalised row, or DataError naming the field (file and row are added by the caller)."""
    if fmt != "messages" and row.get(TOOLS_FIELD) not in (None, "", []):
        # function specs only reach the model through a chat template's tool part: never dropped silently
        raise DataError(f"a '{TOOLS_FIELD}' column needs messages rows (chat turns, with tool_calls and tool "
                        f"results); {fmt} rows would not show the tools to the model", field=TOOLS_FIELD,
                        reason="tools on non-chat rows")
    if fmt == "alpaca":
        return {"instruction": _string(row, cfg.instruction_field, required=True, nonempty=True),
                "input": _string(row, cfg.input_field, required=False, nonempty=False),
                "output": _string(row, cfg.output_field, required=True, nonempty=True)}
    if fmt == "messages":
        tools = _tools(row)
        return {"messages": _messages(row, cfg)} | ({"tools": tools} if tools else {})
    if fmt == "text":
        return {"text": _string(row, cfg.text_field, required=True, nonempty=True)}
    if fmt == "prompt_completion":
        if isinstance(row.get("prompt"), list) or isinstance(row.get("completion"), list):
            raise DataError("conversational prompt/completion rows are not supported; give messages rows, or "
                            "prompt and completion strings", field="prompt", reason="conversational")
        return {"prompt": _string(row, "prompt", required=True, nonempty=False),
                "completion": _string(row, "completion", required=True, nonempty=True)}
    raise DataError(f"unknown format '{fmt}' (known: {', '.join(FORMATS)})")


@dataclass
class ValidRows:
    """The rows that passed validation, each with its row number in the file, and what was skipped."""

    source: str
    format: str
    rows: list[tuple[int, dict[str, Any]]]
    read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def load_rows(source: str, cfg: DataConfig, split: str | None = None) -> ValidRows:
    """Read, detect the format (cfg.format='auto': from the first readable row) and validate every row.

    cfg.on_bad_row='error' raises the first DataError; 'skip' counts skipped rows by reason.
    cfg.max_rows stops after that many valid rows. With an eval split held out of the training data
    (data/holdout.py), `source` 'split:F' reads that part, and cfg.dataset the rest.
    """
    from fasttune.data.holdout import held_out, holdout_fraction, parse_split

    fraction = holdout_fraction(cfg)
    if fraction is not None and (source == cfg.dataset or parse_split(source) is not None):
        whole = load_rows(cfg.dataset, dataclasses.replace(cfg, max_rows=None, eval_dataset="none",
                                                           val_set_size=0.0))
        evals = held_out([n for n, _ in whole.rows], fraction)
        keep = (lambda n: n in evals) if parse_split(source) is not None else (lambda n: n not in evals)
        whole.rows = [(n, r) for n, r in whole.rows if keep(n)]
        if parse_split(source) is None and cfg.max_rows is not None:
            whole.rows = whole.rows[:cfg.max_rows]
        return whole
    fmt = None if cfg.format == "auto" else cfg.format
    if fmt is not None and fmt not in FORMATS:
        raise DataError(f"unknown format '{fmt}' (known: auto, {', '.join(FORMATS)})")
    out = ValidRows(source=source, format=fmt or "", rows=[])
    for number, raw in read_rows(source, split):
        out.read += 1
        try:
            if isinstance(raw, DataError):
                raise raw
            if fmt is None:
                fmt = detect_format(raw, cfg)
                if fmt is None:
                    raise DataError(
                        f"cannot tell the format from the keys {sorted(raw)[:12]}: expected "
                        f"'{cfg.instruction_field}' + '{cfg.output_field}' (alpaca), "
                        f"'{cfg.messages_field}' or '{SHAREGPT_FIELD}' (messages), 'prompt' + 'completion' "
                        f"(prompt_completion), or '{cfg.text_field}' (text); set format and the *_field "
                        "options to match your columns",
                        file=source, row=number, reason="unknown format")
                out.format = fmt
            out.rows.append((number, normalise_row(raw, fmt, cfg)))
        except DataError as e:
            if cfg.on_bad_row != "skip" or e.reason == "unknown format":
                raise e.at(file=source, row=number) from None
            out.skipped[e.reason] += 1
        if cfg.max_rows is not None and len(out.rows) >= cfg.max_rows:
            break
    if not out.format:
        out.format = fmt or ""
    return out
