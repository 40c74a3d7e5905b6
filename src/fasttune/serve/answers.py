"""One request's answer on the event loop: the scheduler's tokens become text pieces, stops applied.

The scheduler thread hands tokens over with `loop.call_soon_threadsafe`; here they are turned into text with
`infer/stream.py`'s incremental detokenizer (never half a character) and stop trimmer (a stop string ends
the answer and is not part of it), exactly as `fasttune generate` prints them. Leaving the iteration early
(a stop string, a client that disconnected) cancels the request, which frees its row at the next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fasttune.infer.stream import IncrementalDetokenizer, StopTrimmer
from fasttune.serve.protocol import APIError, Generation
from fasttune.serve.scheduler import Job, QueueFull, Scheduler


class Answer:
    """Submit `gen` to `scheduler`; iterate `pieces()` for the text. After it: `finish_reason`
    ('stop' | 'length'), `usage` (OpenAI's prompt/completion/total tokens) and `text`."""

    def __init__(self, scheduler: Scheduler, gen: Generation, tokenizer: Any, eos_ids: list[int]) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tokenizer, self.gen = tokenizer, gen
        self.job = Job(gen.prompt_ids, gen.max_new_tokens, gen.sampling, eos_ids, self._emit, seed=gen.seed)
        self.finish_reason: str | None = None
        self.text = ""
        self.started = self.loop.time()
        self.first_token_at: float | None = None
        try:
            scheduler.submit(self.job)
        except QueueFull as e:
            raise APIError(
                429, f"the server is busy: {e}", type="rate_limit_error", code="rate_limit_exceeded"
            ) from None
        except ValueError as e:
            raise APIError(400, str(e), param="max_tokens") from None

    def _emit(self, kind: str, value: object) -> None:  # the scheduler thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    @property
    def usage(self) -> dict[str, int]:
        prompt, new = len(self.gen.prompt_ids), self.job.new_tokens
        return {"prompt_tokens": prompt, "completion_tokens": new, "total_tokens": prompt + new}

    def cancel(self) -> None:
        self.job.cancel()

    async def pieces(self) -> AsyncIterator[str]:
        """The answer's text as it completes. Raises APIError(500) if generation failed."""
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        stops = StopTrimmer(self.gen.stops)
        try:
            while True:
                kind, value = await self.queue.get()
                if kind == "token":
                    if self.first_token_at is None:
                        self.first_token_at = self.loop.time()
                    piece = stops.feed(detok.push(int(value)))
                    if piece:
                        self.text += piece
                        yield piece
                    if stops.stopped:
                        self.finish_reason = "stop"
                        return
                elif kind == "end":
                    self.finish_reason = "stop" if value == "cancelled" else str(value)
                    tail = stops.feed(detok.flush()) + stops.flush()
                    if tail:
                        self.text += tail
                        yield tail
                    return
                else:
                    raise APIError(500, str(value), type="server_error")
        finally:
            self.cancel()  # no-op once the scheduler has finished the job; frees its row otherwise

    async def read_all(self) -> str:
        async for _ in self.pieces():
            pass
        return self.text
