"""Multi-turn chat: the conversation so far rendered with the chat template (or the run's prompt contract),
the reply streamed, and a line-based REPL (`/reset`, `/exit`) that reads any text stream, so a test or a
shell pipe can drive it like a person at a terminal.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any, TextIO

from fasttune.data.templates import PromptContract, encode_prompt, render_messages
from fasttune.infer.stream import TextStream, stream

HELP = "commands: /reset (forget the conversation), /exit (quit); anything else is your message"


class ChatSession:
    """A conversation with one model. `send(text)` streams the reply and records both turns."""

    def __init__(self, model: Any, tokenizer: Any, *, contract: PromptContract | None = None,
                 system: str | None = None, eos_token_ids: list[int] | None = None,
                 max_context: int | None = None, **generation: Any) -> None:
        if contract is None and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template: chat with an instruct/chat model, or a "
                             "run directory whose prompt contract says how to render turns")
        self.model, self.tokenizer, self.contract = model, tokenizer, contract
        self.system = system
        self.eos_token_ids = eos_token_ids
        self.generation = {"max_new_tokens": 256, **generation}
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self.max_context = max_context or limit
        self.messages: list[dict[str, str]] = []
        self.dropped_turns = 0

    def reset(self) -> None:
        self.messages, self.dropped_turns = [], 0

    def _render(self, messages: list[dict[str, str]]) -> list[int]:
        full = ([{"role": "system", "content": self.system}] if self.system else []) + messages
        if self.contract is not None:
            return encode_prompt(render_messages(full, self.contract, self.tokenizer), self.contract,
                                 self.tokenizer)
        text = self.tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
        # The template writes BOS itself where the model wants one.
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, user_text: str) -> list[int]:
        """The prompt for the next reply; the oldest turns are dropped when it would not fit the context."""
        pending = self.messages + [{"role": "user", "content": user_text}]
        ids = self._render(pending)
        budget = (self.max_context - self.generation["max_new_tokens"]) if self.max_context else None
        while budget is not None and len(ids) > budget and len(pending) > 1:
            pending = pending[2:]  # one user turn and its answer
            self.dropped_turns += 1
            ids = self._render(pending)
        self.messages = pending[:-1]
        return ids

    def send(self, user_text: str) -> TextStream:
        """Stream the reply to `user_text`; both turns join the history once the stream is consumed."""
        ids = self.prompt_ids(user_text)
        stops = list(self.contract.stop_strings) if self.contract is not None else None

        def remember(s: TextStream) -> None:
            self.messages += [{"role": "user", "content": user_text},
                              {"role": "assistant", "content": s.text.strip()}]

        return stream(self.model, self.tokenizer, ids, eos_token_ids=self.eos_token_ids, stop_strings=stops,
                      on_finish=remember, **self.generation)


def write_pieces(pieces: Iterable[str], out: TextIO) -> None:
    """Print text as it streams, then a newline; whitespace at the very end (the blank lines a model
    often emits before EOS) is held back and dropped, and the leading whitespace of the reply too."""
    held, started = "", False
    for piece in pieces:
        text = held + piece
        body = text.rstrip()
        held = text[len(body):]
        if not started:
            body = body.lstrip()
            started = bool(body)
        if body:
            out.write(body)
            out.flush()
    out.write("\n")
    out.flush()


def repl(session: ChatSession, lines: Iterable[str] | None = None, out: TextIO | None = None,
         err: TextIO | None = None, show_prompt: bool | None = None) -> int:
    """Read messages line by line until /exit or the end of input; print each reply as it streams.

    Returns the number of replies. Timing goes to `err` so that `out` holds only the conversation.
    """
    lines = sys.stdin if lines is None else lines
    out, err = out or sys.stdout, err or sys.stderr
    if show_prompt is None:
        show_prompt = bool(getattr(lines, "isatty", lambda: False)())
    replies = 0
    if show_prompt:
        err.write(HELP + "\n")

    def ask() -> None:
        if show_prompt:
            err.write("you> ")
            err.flush()

    ask()
    for line in lines:
        text = line.rstrip("\r\n")
        command = text.strip()
        if not command:
            ask()
            continue
        if command == "/exit":
            break
        if command == "/reset":
            session.reset()
            err.write("(conversation cleared)\n")
        elif command.startswith("/") and " " not in command:
            err.write(f"unknown command {command}; {HELP}\n")
        else:
            dropped = session.dropped_turns
            reply = session.send(text)
            write_pieces(reply, out)
            replies += 1
            s = reply.stats
            note = f", {session.dropped_turns - dropped} oldest turn(s) dropped to fit" \
                if session.dropped_turns > dropped else ""
            err.write(f"[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tokens/s{note}]\n")
        ask()
    return replies
