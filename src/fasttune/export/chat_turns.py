"""A chat template cut into the fixed text around each role's message, and that as an Ollama Go template.

The chat template is rendered with placeholder contents; the text between the placeholders is what the
template writes around each message. With S, U, A for system, user and assistant contents,

    render([S, U1, A1, U2], generation prompt) = sys_prefix S sys_suffix user_prefix U1 user_suffix
        assistant_prefix A1 assistant_suffix user_prefix U2 user_suffix generation

and `start_no_system` is what stands before the first user message when there is no system message (a
default system block some templates insert). The pieces are only used when they reproduce the template
exactly on conversations with and without a system message and of one to three user turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_S, _U1, _A1, _U2 = "\x00FT_S\x00", "\x00FT_U1\x00", "\x00FT_A1\x00", "\x00FT_U2\x00"


@dataclass(frozen=True)
class ChatTurns:
    start_no_system: str
    system_prefix: str | None  # None: the template renders no system message
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    generation: str

    def render(self, messages: list[dict[str, str]]) -> str:
        """The conversation as the pieces put it together (ending in a user turn: the generation prompt)."""
        has_system = self.system_prefix is not None and messages and messages[0]["role"] == "system"
        out = [] if has_system else [self.start_no_system]
        for i, m in enumerate(messages):
            last = i == len(messages) - 1
            if m["role"] == "system" and self.system_prefix is not None:
                out += [self.system_prefix, m["content"], self.system_suffix]
            elif m["role"] == "user":
                out += [self.user_prefix, m["content"], self.user_suffix, self.generation if last else ""]
            elif m["role"] == "assistant":
                out += [self.assistant_prefix, m["content"], "" if last else self.assistant_suffix]
        return "".join(out)

    def go_template(self, literal: Any) -> str:
        """Ollama's TEMPLATE: a range over .Messages doing what `render` does. literal: escapes text."""
        start = literal(self.start_no_system)
        if self.system_prefix is not None:
            start = '{{ if ne (index .Messages 0).Role "system" }}' + start + "{{ end }}"
        branches = []
        if self.system_prefix is not None:
            branches.append(
                '{{ if eq $m.Role "system" }}'
                + literal(self.system_prefix)
                + "{{ $m.Content }}"
                + literal(self.system_suffix)
            )
        branches.append(
            ("{{ else if" if branches else "{{ if")
            + ' eq $m.Role "user" }}'
            + literal(self.user_prefix)
            + "{{ $m.Content }}"
            + literal(self.user_suffix)
            + "{{ if $last }}"
            + literal(self.generation)
            + "{{ end }}"
        )
        branches.append(
            '{{ else if eq $m.Role "assistant" }}'
            + literal(self.assistant_prefix)
            + "{{ $m.Content }}{{ if not $last }}"
            + literal(self.assistant_suffix)
            + "{{ end }}{{ end }}"
        )
        return (
            start
            + "{{ range $i, $m := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            + "".join(branches)
            + "{{ end }}"
        )


def _between(text: str, marks: list[str]) -> list[str] | None:
    """The text before, between and after `marks`, which must occur once each, in order."""
    pieces, rest = [], text
    for mark in marks:
        if rest.count(mark) != 1:
            return None
        before, rest = rest.split(mark)
        pieces.append(before)
    return [*pieces, rest]


def _minus_prefix(text: str, prefix: str) -> str | None:
    return text[len(prefix) :] if text.startswith(prefix) else None


def chat_turns(chat_template: str, tokenizer: Any) -> ChatTurns | None:
    """The pieces of `chat_template`, or None where they do not reproduce it exactly."""

    def render(messages: list[tuple[str, str]], generation: bool) -> str | None:
        try:
            return tokenizer.apply_chat_template(
                [{"role": r, "content": c} for r, c in messages],
                tokenize=False,
                add_generation_prompt=generation,
                chat_template=chat_template,
            )
        except Exception:  # a template that refuses a role or an order
            return None

    user, asst, system = "user", "assistant", "system"
    plain = render([(user, _U1), (asst, _A1), (user, _U2)], True)
    plain_nogen = render([(user, _U1), (asst, _A1), (user, _U2)], False)
    closed = render([(user, _U1), (asst, _A1)], False)
    if plain is None or plain_nogen is None or closed is None:
        return None
    p = _between(plain, [_U1, _A1, _U2])
    pn = _between(plain_nogen, [_U1, _A1, _U2])
    c = _between(closed, [_U1, _A1])
    if p is None or pn is None or c is None:
        return None
    user_suffix, assistant_suffix = pn[3], c[2]
    generation = _minus_prefix(p[3], user_suffix)
    assistant_prefix = _minus_prefix(p[1], user_suffix)
    user_prefix = _minus_prefix(p[2], assistant_suffix)
    if (
        generation is None
        or assistant_prefix is None
        or user_prefix is None
        or not p[0].endswith(user_prefix)
    ):
        return None
    start = p[0][: len(p[0]) - len(user_prefix)]

    system_prefix, system_suffix = None, ""
    with_system = render([(system, _S), (user, _U1)], True)
    s = _between(with_system, [_S, _U1]) if with_system is not None else None
    if s is not None and s[1].endswith(user_prefix):
        system_prefix, system_suffix = s[0], s[1][: len(s[1]) - len(user_prefix)]
    turns = ChatTurns(
        start,
        system_prefix,
        system_suffix,
        user_prefix,
        user_suffix,
        assistant_prefix,
        assistant_suffix,
        generation,
    )
    return turns if _reproduces(turns, render, system_prefix is not None) else None


def _reproduces(turns: ChatTurns, render: Any, with_system: bool) -> bool:
    conversations = [
        [("user", "q1")],
        [("user", "q1"), ("assistant", "a1"), ("user", "q2")],
        [("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2"), ("user", "q3")],
    ]
    if with_system:
        conversations += [[("system", "s")] + c for c in conversations]
    for conv in conversations:
        messages = [{"role": r, "content": c} for r, c in conv]
        if render(conv, True) != turns.render(messages):
            return False
    return True
