"""Prompt templates and the prompt contract: how a row becomes text, and the token ids that frame it.

One `PromptContract` per run: the template, BOS/EOS/pad ids and stop strings used
in training; the run saves it and every export and the inference code read it back, so a prompt at
generation time is rendered exactly as in training.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fasttune.data.errors import DataError

# The Stanford Alpaca prompts, verbatim (tatsu-lab/stanford_alpaca, train.py PROMPT_DICT).
ALPACA_PROMPT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
TEMPLATES = ("alpaca", "chat", "text")
_PROBE = "FASTTUNE_PROBE_ANSWER"


@dataclass
class PromptContract:
    """What frames every prompt of a run. `template` is 'alpaca', 'chat' or 'text' (the
    prompt as written: plain text rows, TRL's prompt/completion rows, plain prompts of preference rows).

    add_bos: prepend `bos_id` to tokenized alpaca/text rows (the tokenizer's own habit); chat
    templates write BOS themselves when they want one. end_of_turn: for chat, the special token the
    template closes an assistant turn with (ChatML '<|im_end|>'); None when it writes none, and then
    EOS is appended after each assistant turn.
    """

    template: str
    eos_id: int
    eos_token: str
    pad_id: int
    bos_id: int | None = None
    bos_token: str | None = None
    add_bos: bool = False
    prompt_template: str | None = None
    prompt_template_no_input: str | None = None
    chat_template: str | None = None
    end_of_turn: str | None = None
    stop_strings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PromptContract:
        """A contract as saved; one saved before the plain-text template was renamed says 'completion',
        which is read as 'text' (the same framing: the prompt as written)."""
        if d.get("template") == "completion":
            d = {**d, "template": "text"}
        return cls(**d)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> PromptContract:
        return cls.from_dict(json.loads(Path(path).read_text()))


def resolve_template(template: str, fmt: str) -> str:
    """The template a format is rendered with: 'auto' means alpaca for alpaca rows."""
    if fmt == "text":
        return "text"
    if fmt == "prompt_completion":  # TRL's: the prompt is used as written, no template around it
        if template == "chat":
            raise DataError("prompt/completion rows are used as written; template 'chat' (or a "
                            "chat_template) does not apply to them: give messages rows for a chat template")
        return "text"
    if fmt == "messages":
        if template == "alpaca":
            raise DataError("template 'alpaca' renders alpaca rows only; messages rows always use the "
                            "tokenizer's chat template (set template to auto or chat)")
        return "chat"
    if template in ("auto", "alpaca"):
        return "alpaca"
    if template == "chat":
        return "chat"
    if template == "text":
        raise DataError("template 'text' renders the plain prompts of preference and RL rows; alpaca "
                        "rows take auto, alpaca or chat")
    raise DataError(f"unknown template '{template}' (known: auto, alpaca, chat)")


def special_token_strings(tokenizer: Any) -> list[str]:
    """Every special token the tokenizer knows, longest first."""
    names = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
        if getattr(tok, "special", False):
            names.add(str(tok))
    return sorted((n for n in names if n), key=len, reverse=True)


def find_end_marker(text: str, start: int, specials: list[str]) -> tuple[int, int] | None:
    """(begin, end) of the first special token in text[start:], or None."""
    best = None
    for s in specials:
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, i + len(s))
    return best


def _adds_bos(tokenizer: Any) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(plain) and with_special[0] == bos


def _pad_id(tokenizer: Any, eos_id: int) -> int:
    """A pad id other than EOS where one exists. Pads are masked by attention_mask and targets, never by
    id, so this only keeps exported configs honest; EOS is the last resort."""
    for candidate in (tokenizer.pad_token_id, getattr(tokenizer, "unk_token_id", None)):
        if candidate is not None and candidate != eos_id:
            return int(candidate)
    for tok_id in sorted(getattr(tokenizer, "added_tokens_decoder", None) or {}):
        if tok_id not in (eos_id, tokenizer.bos_token_id):
            return int(tok_id)
    return int(eos_id)


def make_contract(template: str, fmt: str, tokenizer: Any) -> PromptContract:
    """The prompt contract for rows of format `fmt` rendered with `template` (auto/alpaca/chat)."""
    name = resolve_template(template, fmt)
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; fasttune trains EOS after every response and "
                        "needs one (set tokenizer.eos_token)")
    eos_id, eos_token = int(tokenizer.eos_token_id), str(tokenizer.eos_token)
    contract = PromptContract(
        template=name, eos_id=eos_id, eos_token=eos_token, pad_id=_pad_id(tokenizer, eos_id),
        bos_id=tokenizer.bos_token_id, bos_token=tokenizer.bos_token,
    )
    if name == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "this tokenizer has no chat template, which "
                + ("messages rows need" if fmt == "messages" else "template 'chat' needs")
                + ": use an instruct/chat model, set tokenizer.chat_template, or use alpaca rows with "
                "template 'alpaca'")
        contract.chat_template = tokenizer.chat_template
        contract.end_of_turn = _detect_end_of_turn(tokenizer, contract.chat_template)
        contract.stop_strings = list(dict.fromkeys(s for s in (contract.end_of_turn, eos_token) if s))
    else:
        contract.add_bos = _adds_bos(tokenizer)
        if name == "alpaca":
            contract.prompt_template = ALPACA_PROMPT
            contract.prompt_template_no_input = ALPACA_PROMPT_NO_INPUT
            contract.stop_strings = [eos_token, "### Instruction:"]
        else:
            contract.stop_strings = [eos_token]
    return contract


def _detect_end_of_turn(tokenizer: Any, chat_template: str) -> str | None:
    probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _PROBE}]
    try:
        text = tokenizer.apply_chat_template(probe, tokenize=False, chat_template=chat_template)
    except Exception:  # a template that rejects the probe leaves the choice to EOS
        return None
    at = text.rfind(_PROBE)
    marker = find_end_marker(text, at + len(_PROBE), special_token_strings(tokenizer)) if at >= 0 else None
    return text[marker[0]:marker[1]] if marker else None


def alpaca_text(instruction: str, input: str, contract: PromptContract) -> str:
    """The alpaca prompt (everything before the response)."""
    if input.strip():
        return (contract.prompt_template or ALPACA_PROMPT).format(instruction=instruction, input=input)
    return (contract.prompt_template_no_input or ALPACA_PROMPT_NO_INPUT).format(instruction=instruction)


def alpaca_as_user_message(instruction: str, input: str) -> str:
    """How template='chat' turns an alpaca row's instruction and input into one user turn."""
    return f"{instruction}\n\n{input}" if input.strip() else instruction


def render_chat(messages: list[dict[str, Any]], contract: PromptContract, tokenizer: Any,
                add_generation_prompt: bool, tools: list[dict[str, Any]] | None = None) -> str:
    """The conversation as text through the contract's chat template, in transformers' sandboxed Jinja
    environment; `tools` (function specs) are passed to the template as apply_chat_template passes them."""
    if not contract.chat_template:
        raise DataError("this run's prompt contract has no chat template")
    return tokenizer.apply_chat_template(messages, tokenize=False, chat_template=contract.chat_template,
                                         add_generation_prompt=add_generation_prompt, tools=tools or None)


def render_prompt(instruction: str, input: str, contract: PromptContract, tokenizer: Any) -> str:
    """The generation-time prompt for one question: exactly the text that precedes a trained answer."""
    if contract.template == "alpaca":
        return alpaca_text(instruction, input or "", contract)
    if contract.template == "chat":
        user = [{"role": "user", "content": alpaca_as_user_message(instruction, input or "")}]
        return render_chat(user, contract, tokenizer, add_generation_prompt=True)
    return f"{instruction}\n\n{input}" if input else instruction


def render_messages(messages: list[dict[str, Any]], contract: PromptContract, tokenizer: Any,
                    tools: list[dict[str, Any]] | None = None) -> str:
    """The generation-time prompt for a conversation ending in a user (or tool) turn. With an alpaca
    contract the earlier turns become alpaca blocks with their answers, and system turns are dropped."""
    if contract.template == "chat":
        return render_chat(messages, contract, tokenizer, add_generation_prompt=True, tools=tools)
    if tools or any(m.get("tool_calls") or m["role"] == "tool" for m in messages):
        raise DataError(f"a conversation with tools needs a chat template that renders them; this run's "
                        f"template is {contract.template!r}")
    text, pending = "", None
    for m in messages:
        if m["role"] == "user":
            pending = m["content"]
        elif m["role"] == "assistant" and pending is not None:
            text += render_prompt(pending, "", contract, tokenizer) + m["content"] + "\n\n"
            pending = None
    return text + render_prompt(pending or "", "", contract, tokenizer)


def encode_prompt(text: str, contract: PromptContract, tokenizer: Any) -> list[int]:
    """Token ids of a rendered prompt, with BOS exactly as training put it (never doubled)."""
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if contract.add_bos and contract.bos_id is not None and (not ids or ids[0] != contract.bos_id):
        ids.insert(0, contract.bos_id)
    return ids
