"""Continuous batching: one thread owns the model and decodes every admitted request in the same forward.

The KV cache (`infer/static_decode.StaticKV`) has `slots` rows of `max_len` columns. A request takes a free
row; its prompt is prefilled into columns 0..T-1 of that row alone; from then on each step feeds one token
per row at the row's own column, which is also its position, so rows of different lengths step together.
New requests join at a step boundary and finished or cancelled ones leave their row to the next:
```
step        row 0 (A: prompt a b c)      row 1 (B: prompt d e, joins at step 2)   row 2 (free)
prefill A   a b c -> x                   .                                        .
step 1      feeds x at column 3 -> y     .                                        (token 0 at col 0)
prefill B   .                            d e -> u
step 2      feeds y at column 4 -> EOS   feeds u at column 2 -> v                 (token 0 at col 0)
step 3      (A left: free)               feeds v at column 3 -> ...
```
A free row still rides along (the step's shapes never change, which a CUDA graph needs); it feeds token 0
at column 0 and sees that one key, so its logits are finite and ignored. Rows never mix: every product of
the step is row by row, and each row samples with its own settings and its own random generator.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fasttune.infer.sampling import SamplingParams, pick_next, process_logits
from fasttune.infer.static_decode import Decoder, decode_variant, resolve_compile

log = logging.getLogger("fasttune.serve")


class QueueFull(Exception):
    """More requests are waiting for a row than the queue holds."""


@dataclass
class Job:
    """One generation request as the scheduler sees it.

    `emit(kind, value)` is called from the scheduler thread: ('token', id) for each new token, then exactly
    one ('end', 'stop' | 'length' | 'cancelled') or ('error', message).
    """

    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams
    eos_ids: list[int]
    emit: Callable[[str, object], None]
    seed: int | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    new_tokens: int = 0

    def cancel(self) -> None:
        """Ask the scheduler to drop this request at the next step boundary (its row becomes free)."""
        self.cancelled.set()


@dataclass
class _Row:
    job: Job
    column: int  # the cache column (= position) of the token fed next
    token: int  # the token fed next
    generator: torch.Generator | None


class Scheduler:
    """Owns `model` (our Llama-family model) and serves `Job`s through continuous batching.

    slots: rows decoded together; max_len: cache columns per row (prompt + new tokens of one request);
    max_queue: requests that may wait for a row before `submit` raises QueueFull; compile: 'auto' (a CUDA
    graph of the step for a 16-bit model on a GPU, else eager), 'eager' or 'cuda_graph'.
    """

    def __init__(
        self, model: torch.nn.Module, *, slots: int, max_len: int, max_queue: int, compile: str = "auto"
    ) -> None:
        from fasttune.infer.generate import is_own_model

        if not is_own_model(model):
            raise ValueError(
                "serving with continuous batching needs a Llama-family model (Llama, Mistral, "
                "Qwen2/3, SmolLM), which fasttune runs on its own model"
            )
        if slots < 1 or max_len < 2 or max_queue < 0:
            raise ValueError(
                f"slots={slots}, max_len={max_len}, max_queue={max_queue}: need slots >= 1, "
                "max_len >= 2, max_queue >= 0"
            )
        if compile not in ("auto", "eager", "cuda_graph"):
            raise ValueError(f"compile={compile!r}: expected auto, eager or cuda_graph")
        self.model = model
        self.slots, self.max_len, self.max_queue = slots, max_len, max_queue
        emb = model.get_input_embeddings().weight
        self.device, self.vocab = emb.device, emb.shape[0]
        resolved = resolve_compile(
            model, "auto" if compile == "auto" else (False if compile == "eager" else "cuda_graph")
        )
        mode, fused = decode_variant(resolved)
        # A Decoder of its own (not infer's per-model cache): its buffers must not be resized by a
        # `generate` call on the same model elsewhere in the process.
        self.decoder = Decoder(model, mode, fused)
        self.static = self.decoder.buffers_for(model, slots, max_len)
        self.mode = mode
        self._rows: list[_Row | None] = [None] * slots
        self._waiting: deque[Job] = deque()
        self._wake = threading.Condition()
        self._stop = False
        self._in_flight = 0  # submitted and not yet ended (waiting, being prefilled, or in a row)
        self._thread = threading.Thread(target=self._run, name="fasttune-scheduler", daemon=True)
        self.steps = 0  # decoding steps run (batched forwards)
        self.cancelled = 0  # requests dropped before their end (a client that went away, a stop string)

    # ---- the caller's side (any thread) ------------------------------------------------------------

    def start(self) -> Scheduler:
        self._thread.start()
        return self

    def shutdown(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify_all()
        self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue `job`; it joins the batch at the next step boundary with a free row."""
        if not job.prompt_ids:
            raise ValueError("empty prompt")
        if len(job.prompt_ids) + job.max_new_tokens > self.max_len:
            raise ValueError(
                f"prompt ({len(job.prompt_ids)} tokens) + max_new_tokens ({job.max_new_tokens}) "
                f"> the server's context of {self.max_len} tokens"
            )
        with self._wake:
            if len(self._waiting) >= self.max_queue + self.free_rows():
                raise QueueFull(f"{len(self._waiting)} requests are waiting; try again later")
            self._waiting.append(job)
            self._in_flight += 1
            self._wake.notify_all()

    def free_rows(self) -> int:
        return sum(r is None for r in self._rows)

    def load(self) -> dict[str, int]:
        """Rows in use, requests waiting, and the capacity: what /health reports."""
        return {
            "slots": self.slots,
            "active": self.slots - self.free_rows(),
            "waiting": len(self._waiting),
            "in_flight": self._in_flight,
            "max_queue": self.max_queue,
            "context": self.max_len,
        }

    # ---- the scheduler thread ----------------------------------------------------------------------

    def _run(self) -> None:
        with torch.no_grad():
            while True:
                with self._wake:
                    while not self._stop and not self._waiting and self.free_rows() == self.slots:
                        self._wake.wait()
                    if self._stop:
                        break
                try:
                    self._admit()
                    if self.free_rows() < self.slots:
                        self._step()
                except Exception as e:  # a failed forward fails the requests in it, never the server
                    log.exception("scheduler step failed")
                    for b, row in enumerate(self._rows):
                        if row is not None:
                            self._end(row.job, "error", f"generation failed: {type(e).__name__}: {e}")
                            self._rows[b] = None
        for row in self._rows:
            if row is not None:
                self._end(row.job, "end", "cancelled")
        for job in self._waiting:
            self._end(job, "end", "cancelled")

    def _admit(self) -> None:
        """Prefill waiting requests into free rows (one forward each) and hand out their first token."""
        while self.free_rows():
            with self._wake:
                if not self._waiting:
                    return
                job = self._waiting.popleft()
            if job.cancelled.is_set():
                self._drop(job)
                continue
            b = self._rows.index(None)
            try:
                logits = self._prefill(b, job.prompt_ids)
            except Exception as e:
                log.exception("prefill failed")
                self._end(job, "error", f"generation failed: {type(e).__name__}: {e}")
                continue
            seed = job.seed if job.seed is not None else secrets.randbits(63)
            generator = (
                torch.Generator(device=self.device).manual_seed(seed) if job.sampling.do_sample else None
            )
            row = _Row(job, len(job.prompt_ids), 0, generator)
            self._rows[b] = row
            self._deliver(b, row, self._pick(row, logits))

    def _prefill(self, b: int, prompt: list[int]) -> torch.Tensor:
        """Run the prompt through the model into row b's columns 0..T-1; return its next-token logits (1, V).

        The forward is the one `generate` runs for a single prompt (all-ones mask, positions 0..T-1), so
        the first token is the one `fasttune generate` picks.
        """
        T = len(prompt)
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)  # (1, T)
        positions = torch.arange(T, device=self.device)[None]  # (1, T)
        self.static.key_mask[b] = False
        self.static.key_mask[b, :T] = True
        out = self.model(
            ids,
            position_ids=positions,
            attention_mask=torch.ones_like(ids),
            kv_cache=self.static.kv_cache.rows(b, b + 1),
            logits_to_keep=1,
        )
        return out.logits[:, -1].float()  # (1, V)

    def _step(self) -> None:
        """Drop cancelled rows, then one decoding step over every row; hand out each active row's token."""
        for b, row in enumerate(self._rows):
            if row is not None and row.job.cancelled.is_set():
                self._drop(row.job)
                self._rows[b] = None
        active = [(b, row) for b, row in enumerate(self._rows) if row is not None]
        if not active:
            return
        tokens = torch.zeros(self.slots, dtype=torch.long)
        columns = torch.zeros(self.slots, dtype=torch.long)
        for b, row in active:
            tokens[b], columns[b] = row.token, row.column
        tokens, columns = tokens.to(self.device), columns.to(self.device)
        # (S, 1) tokens at (S, 1) positions, written at each row's own column (S,)
        logits = self.decoder(self.model, self.static, tokens[:, None], columns[:, None], columns)  # (S, V)
        self.steps += 1
        greedy = logits.argmax(dim=-1).tolist()
        for b, row in active:
            row.column += 1
            token = self._pick(row, logits[b : b + 1]) if row.job.sampling.do_sample else greedy[b]
            self._deliver(b, row, token)

    def _end(self, job: Job, kind: str, value: str) -> None:
        """The one way a job ends: its last message, and it no longer counts as in flight."""
        with self._wake:
            self._in_flight -= 1
        job.emit(kind, value)

    def _drop(self, job: Job) -> None:
        self.cancelled += 1
        self._end(job, "end", "cancelled")

    def _pick(self, row: _Row, logits: torch.Tensor) -> int:
        """The row's next token from its (1, V) logits, with its own sampling settings and generator."""
        sampling = row.job.sampling
        return int(pick_next(process_logits(logits, sampling), sampling, row.generator)[0])

    def _deliver(self, b: int, row: _Row, token: int) -> None:
        job = row.job
        job.new_tokens += 1
        job.emit("token", token)
        if token in job.eos_ids:
            self._end(job, "end", "stop")
        elif job.new_tokens >= job.max_new_tokens:
            self._end(job, "end", "length")
        else:
            row.token = token
            return
        self._rows[b] = None


def wait_idle(scheduler: Scheduler, timeout: float = 10.0) -> bool:
    """True once every submitted request has ended (tests: a cancelled request has left its row)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if scheduler.load()["in_flight"] == 0:
            return True
        time.sleep(0.02)
    return False
