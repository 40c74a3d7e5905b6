"""Streaming text: token ids become text pieces as they are generated, never a broken character.

Byte-level tokenizers split one Korean syllable or emoji over several tokens, so the text of a token alone
is often half a character. `IncrementalDetokenizer` decodes a short window of recent tokens and emits only
the text that has become complete (a decode ending in U+FFFD waits for the next token):
```
tokens      "안" = EC 95 88 split as [EC 95] [88]
push [EC 95]  decode -> "\ufffd"          emit ""      (held back)
push [88]     decode -> "안"              emit "안"
```
The pieces joined equal `tokenizer.decode` of all the tokens. `stream` wraps generation into an iterator of
such pieces, with stop strings trimmed off and timing kept for the caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from fasttune.infer.generate import GenerationStats, iter_tokens, resolve_eos
from fasttune.infer.sampling import SamplingParams

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Token ids in, complete text out. Keeps two offsets into the ids (as text-generation-inference does):
    text before `read` has been emitted; decoding starts at `prefix` so that the tokenizer sees some context
    (leading-space rules of SentencePiece) and the window stays short."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ('' while a character is still unfinished)."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self) -> str:
        """Whatever is still held back (a truly incomplete byte sequence at the end decodes as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix:self.read])
        now = self._decode(self.ids[self.prefix:])
        if len(now) <= len(before) or (now.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]


class StopTrimmer:
    """Cuts the text at the first stop string; holds back a tail that could still become one."""

    def __init__(self, stop_strings: Sequence[str] | None) -> None:
        self.stops = [s for s in (stop_strings or []) if s]
        self.pending = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        text = self.pending + piece
        cut = min((i for i in (text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self.pending = True, ""
            return text[:cut]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.pending = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        rest, self.pending = ("" if self.stopped else self.pending), ""
        return rest


class TextStream:
    """An iterator of text pieces for one prompt. After it is exhausted: `text` (all of it, stop strings
    trimmed), `token_ids` (the generated ids) and `stats` (timing; `stats.tokens_per_s`)."""

    def __init__(self, tokens: Iterator[torch.Tensor], tokenizer: Any, stop_strings: Sequence[str] | None,
                 skip_special_tokens: bool, stats: GenerationStats,
                 on_finish: Callable[[TextStream], None] | None = None) -> None:
        self._tokens = tokens
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._stops = StopTrimmer(stop_strings)
        self._on_finish = on_finish
        self._pieces = self._run()
        self.stats = stats
        self.text = ""
        self.finished = False

    @property
    def token_ids(self) -> list[int]:
        return list(self._detok.ids)

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str:
        return next(self._pieces)

    def _run(self) -> Iterator[str]:
        for token in self._tokens:
            piece = self._stops.feed(self._detok.push(int(token[0])))
            if piece:
                self.text += piece
                yield piece
            if self._stops.stopped:
                break
        tail = self._stops.feed(self._detok.flush()) + self._stops.flush()
        if tail:
            self.text += tail
            yield tail
        self.finished = True
        if self._on_finish is not None:
            self._on_finish(self)

    def read_all(self) -> str:
        """Consume the rest and return the whole text."""
        for _ in self:
            pass
        return self.text


def encode(tokenizer: Any, prompt: str | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """(1, T) ids: a string is tokenized with the tokenizer's usual special tokens (BOS where it adds one)."""
    if isinstance(prompt, str):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    else:
        ids = torch.as_tensor(prompt, dtype=torch.long)
    ids = ids.reshape(1, -1) if ids.dim() == 1 else ids
    if ids.shape[0] != 1 or ids.shape[1] == 0:
        raise ValueError(f"stream: one non-empty prompt at a time, got ids of shape {tuple(ids.shape)}")
    return ids


def stream(
    model: Any,
    tokenizer: Any,
    prompt: str | Sequence[int] | torch.Tensor,
    *,
    max_new_tokens: int = 256,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    eos_token_ids: int | Sequence[int] | None = None,
    stop_strings: Sequence[str] | None = None,
    seed: int | None = None,
    compile: bool | str = "auto",
    skip_special_tokens: bool = True,
    on_finish: Callable[[TextStream], None] | None = None,
) -> TextStream:
    """Generate for one prompt and iterate over the new text as it is produced.

    prompt: text (tokenized with the tokenizer's special tokens) or token ids (used as they are).
    Stop strings end the generation and are not part of the text.
    """
    ids = encode(tokenizer, prompt)
    stats = GenerationStats()
    tokens = iter_tokens(
        model, ids, None, max_new_tokens=max_new_tokens,
        sampling=SamplingParams(do_sample, temperature, top_p, top_k, repetition_penalty),
        eos_token_ids=resolve_eos(eos_token_ids, tokenizer), stop_strings=stop_strings, tokenizer=tokenizer,
        seed=seed, compile=compile, stats=stats)
    return TextStream(tokens, tokenizer, stop_strings, skip_special_tokens, stats, on_finish)
