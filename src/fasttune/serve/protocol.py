"""The OpenAI request bodies we accept, checked field by field, and the error body every refusal carries.

A request becomes `Generation`: prompt ids, sampling settings, stops. Every field the OpenAI API defines for
these routes is either mapped onto ours, accepted only at its default value (`n`: 1, penalties: 0, ...), or
refused with a 400 that names it, as is any field the API does not define:

| OpenAI field | ours |
|---|---|
| `temperature` (default 1) | 0: greedy; > 0: sampling at that temperature |
| `top_p` (default 1) | nucleus sampling mass, (0, 1] |
| `max_tokens`, `max_completion_tokens` | max_new_tokens (chat: default the rest of the context; else 16) |
| `stop` (string or up to 4) | stop strings, cut from the text (chat also stops at the run's own stops) |
| `seed` | the request's own random generator (same seed, same settings, same answer) |
| `stream`, `stream_options.include_usage` | server-sent events; a last chunk with the usage |
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fasttune.infer.sampling import SamplingParams

if TYPE_CHECKING:
    from starlette.requests import Request

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_STOPS = 4
ROLES = ("system", "user", "assistant")


class APIError(Exception):
    """A refusal in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str | None, message: str) -> APIError:
    return APIError(400, message, param=param)


@dataclass
class ModelInfo:
    """What request parsing needs to know about the served model."""

    id: str
    tokenizer: Any
    contract: Any  # data.templates.PromptContract, or None for a base model
    eos_ids: list[int]
    context: int  # prompt + new tokens of one request


@dataclass
class Generation:
    """A checked request: what to generate and how to answer."""

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int | None
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it passes `limit` bytes (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(
            413,
            f"the request body is larger than the server's limit of {limit} bytes",
            code="request_too_large",
        )
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413,
                f"the request body is larger than the server's limit of {limit} bytes",
                code="request_too_large",
            )
        chunks.append(chunk)
    return b"".join(chunks)


def parse_body(raw: bytes) -> dict[str, Any]:
    """The JSON object of a request body (NaN and Infinity are not JSON and are refused too)."""

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not a JSON number")

    try:
        body = json.loads(raw, parse_constant=no_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise bad(None, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise bad(None, f"the request body must be a JSON object, not {_type_name(body)}")
    return body


# Fields accepted only at the value that means "off"; anything else would change the answer's meaning.
_DEFAULT_ONLY = {
    "n": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "echo": False,
    "best_of": 1,
    "top_logprobs": 0,
}
_COMMON = {"model", "temperature", "top_p", "max_tokens", "stop", "seed", "stream", "stream_options", "user"}
CHAT_FIELDS = _COMMON | {
    "messages",
    "max_completion_tokens",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "top_logprobs",
}
COMPLETION_FIELDS = _COMMON | {
    "prompt",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logprobs",
    "echo",
    "best_of",
}


def parse_chat(body: dict[str, Any], info: ModelInfo) -> Generation:
    """POST /v1/chat/completions -> Generation; the messages rendered with the run's prompt contract."""
    _check_fields(body, CHAT_FIELDS)
    _check_model(body, info)
    if "messages" not in body:
        raise bad("messages", "missing required field 'messages'")
    messages = _messages(body["messages"])
    ids = render_chat(messages, info)
    stops = list(info.contract.stop_strings) if info.contract is not None else []
    limit = _opt_int(body, "max_tokens", 1)
    other = _opt_int(body, "max_completion_tokens", 1)
    if limit is not None and other is not None and limit != other:
        raise bad("max_completion_tokens", "max_tokens and max_completion_tokens differ; give one")
    return _generation(body, info, ids, limit if limit is not None else other, "messages", stops)


def parse_completion(body: dict[str, Any], info: ModelInfo) -> Generation:
    """POST /v1/completions -> Generation; the prompt tokenized as it is (`fasttune generate --raw`)."""
    _check_fields(body, COMPLETION_FIELDS)
    _check_model(body, info)
    if "prompt" not in body:
        raise bad("prompt", "missing required field 'prompt'")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad("prompt", "prompt is empty")
        ids = list(info.tokenizer(prompt)["input_ids"])
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        vocab = len(info.tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise bad("prompt", f"prompt holds token ids outside the vocabulary (0..{vocab - 1})")
        ids = list(prompt)
    else:
        raise bad(
            "prompt",
            "prompt must be a non-empty string, a list of one string, or a list of token "
            "ids (several prompts per request are not supported)",
        )
    limit = _opt_int(body, "max_tokens", 1)
    return _generation(
        body, info, ids, limit if limit is not None else DEFAULT_COMPLETION_TOKENS, "prompt", []
    )


def render_chat(messages: list[dict[str, str]], info: ModelInfo) -> list[int]:
    """Prompt ids of a conversation: the run's contract (chat template or Alpaca, as in training), else the
    tokenizer's chat template, as `fasttune chat` renders it."""
    from fasttune.data.templates import encode_prompt, render_messages

    tok = info.tokenizer
    if info.contract is not None:
        return encode_prompt(render_messages(messages, info.contract, tok), info.contract, tok)
    if not getattr(tok, "chat_template", None):
        raise bad(
            "messages",
            "this model has no chat template and no run prompt contract; use "
            "/v1/completions with a plain prompt",
        )
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _generation(
    body: dict[str, Any],
    info: ModelInfo,
    ids: list[int],
    max_tokens: int | None,
    prompt_field: str,
    stops: list[str],
) -> Generation:
    room = info.context - len(ids)
    if room < 1:
        raise bad(
            prompt_field,
            f"the prompt is {len(ids)} tokens; the server's context is {info.context} "
            "tokens, which leaves no room for an answer",
        )
    if max_tokens is None:
        max_tokens = room
    elif max_tokens > room:
        raise bad(
            "max_tokens",
            f"max_tokens={max_tokens} does not fit: the prompt is {len(ids)} tokens and "
            f"the context {info.context}, which leaves {room}",
        )
    temperature = _opt_number(body, "temperature", 0.0, 2.0)
    top_p = _opt_number(body, "top_p", 0.0, 1.0)
    if top_p is not None and top_p == 0.0:
        raise bad("top_p", "top_p=0 is not supported: it must be in (0, 1]")
    temperature = 1.0 if temperature is None else temperature
    sampling = SamplingParams(
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else 1.0,
        top_p=1.0 if top_p is None else top_p,
    )
    seed = _opt_int(body, "seed", None)
    stream = _opt_bool(body, "stream") or False
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad("stream_options", "stream_options is only allowed with stream=true")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad("stream_options", "stream_options may hold only 'include_usage'")
        include_usage = _opt_bool(options, "include_usage", "stream_options.include_usage") or False
    if body.get("user") is not None and not isinstance(body["user"], str):
        raise bad("user", "user must be a string")
    return Generation(
        ids, max_tokens, sampling, seed, stops + _stops(body.get("stop")), stream, include_usage
    )


def _check_fields(body: dict[str, Any], known: set[str]) -> None:
    for name, value in body.items():
        if name not in known:
            raise bad(name, f"unsupported parameter '{name}'")
        if name in _DEFAULT_ONLY and value is not None:
            default = _DEFAULT_ONLY[name]
            if type(value) is not type(default) or value != default:
                raise bad(name, f"{name}={json.dumps(value)} is not supported (only {json.dumps(default)})")


def _check_model(body: dict[str, Any], info: ModelInfo) -> None:
    model = body.get("model")
    if model is None:
        raise bad("model", "missing required field 'model'")
    if not isinstance(model, str):
        raise bad("model", f"model must be a string, not {_type_name(model)}")
    if model != info.id:
        raise APIError(
            404,
            f"the model '{model}' does not exist; this server serves '{info.id}'",
            param="model",
            code="model_not_found",
        )


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise bad("messages", "messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(where, f"{where} must be an object with role and content")
        extra = set(m) - {"role", "content"}
        if extra:
            raise bad(f"{where}.{sorted(extra)[0]}", f"{where}.{sorted(extra)[0]} is not supported")
        role = m.get("role")
        if role not in ROLES:
            raise bad(
                f"{where}.role", f"{where}.role must be one of {', '.join(ROLES)}, not {json.dumps(role)}"
            )
        out.append({"role": role, "content": _content(m.get("content"), f"{where}.content")})
    if out[-1]["role"] != "user":
        raise bad(f"messages[{len(out) - 1}].role", "the last message must be the user's")
    return out


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:  # content parts: text only
        parts = []
        for j, part in enumerate(value):
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                raise bad(
                    f"{where}[{j}]", f"{where}[{j}]: only {{'type': 'text', 'text': ...}} parts are supported"
                )
            parts.append(part["text"])
        return "".join(parts)
    raise bad(where, f"{where} must be a string (or a list of text parts), not {_type_name(value)}")


def _stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise bad("stop", "stop must be a non-empty string or a list of non-empty strings")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"stop holds {len(stops)} strings; at most {MAX_STOPS}")
    return list(stops)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt_int(body: dict[str, Any], name: str, low: int | None) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v):
        raise bad(name, f"{name} must be an integer, not {_type_name(v)}")
    if low is not None and v < low:
        raise bad(name, f"{name}={v}: must be at least {low}")
    if not -(2**63) <= v < 2**63:
        raise bad(name, f"{name}={v}: out of range")
    return v


def _opt_number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise bad(name, f"{name} must be a number, not {_type_name(v)}")
    if not low <= v <= high:
        raise bad(name, f"{name}={v}: must be between {low:g} and {high:g}")
    return float(v)


def _opt_bool(body: dict[str, Any], name: str, where: str | None = None) -> bool | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, bool):
        raise bad(where or name, f"{where or name} must be true or false, not {_type_name(v)}")
    return v


def _type_name(v: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        type(None): "null",
    }.get(type(v), type(v).__name__)
