"""Text generation: prefill the prompt into a KV cache, then one token at a time until EOS, a stop string or
`max_new_tokens`, for batched left-padded prompts.

Our Llama-family model runs the loop here (optionally through a compiled, CUDA-graphed step); any other
model (the generic path) runs transformers' own `generate`. Both accept a transformers-style streamer
(`put(tensor)`, `end()`), which is how transformers' `TextStreamer` works with either.

Left padding, two prompts `a b c` and `d e`:
```
input_ids       a  b  c          attention_mask  1 1 1
                pad d  e                          0 1 1
position_ids    0  1  2   (then 3, 4, ...)        0 0 1   (then 2, 3, ...: real tokens counted)
```
On CUDA the loop is pipelined: the host queues step i+1 before it waits for token i, so the GPU never idles
while Python checks and hands out a token (the next step only needs the token on the device):
```
GPU   | step i | pick i, copy to host | step i+1                     | pick i+1, copy | step i+2 ...
host    queue pick i, copies, step i+1 ^wait  yield token i, queue pick i+1, copies, step i+2 ^wait ...
```
When token i finishes every row, step i+1 has run for nothing (never past the cache: the last step queues
no further step).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from queue import Queue
from typing import Any

import torch

from fasttune.infer.sampling import SamplingParams, pick_next, process_logits
from fasttune.infer.static_decode import bucket_length, decoder_for, resolve_compile


@dataclass
class GenerationStats:
    """Filled in by a generation: how long the prompt and the new tokens took."""

    prompt_tokens: int = 0
    new_tokens: int = 0  # per row, the longest row
    prefill_s: float = 0.0  # until the first new token was on the host
    decode_s: float = 0.0  # from the first new token to the last, wall time (the caller's share included)

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of the whole call (prefill included), as a user perceives it."""
        total = self.prefill_s + self.decode_s
        return self.new_tokens / total if total > 0 else 0.0


def is_own_model(model: Any) -> bool:
    """True for our Llama-family model, which this module decodes itself."""
    from fasttune.models.llama import LlamaForCausalLM

    return isinstance(model, LlamaForCausalLM)


def resolve_eos(eos_token_ids: int | Sequence[int] | None, tokenizer: Any) -> list[int]:
    """EOS ids as a list; None means the tokenizer's EOS (an error without one)."""
    if eos_token_ids is None:
        if tokenizer is None or tokenizer.eos_token_id is None:
            raise ValueError("generate: pass eos_token_ids (or a tokenizer with an EOS token); use [] to "
                             "decode until max_new_tokens")
        return [int(tokenizer.eos_token_id)]
    if isinstance(eos_token_ids, int):
        return [eos_token_ids]
    return [int(i) for i in eos_token_ids]


def check_left_padded(attention_mask: torch.Tensor) -> None:
    """Generation appends after the last column, so padding must be on the left."""
    m = attention_mask.bool()
    if m.shape[1] > 1 and bool((m[:, :-1] & ~m[:, 1:]).any()):
        raise ValueError("generate: attention_mask has padding on the right; batched prompts must be "
                         "left-padded (tokenizer.padding_side = 'left')")
    if not bool(m[:, -1].all()):
        raise ValueError("generate: a prompt row is empty or ends in padding")


@torch.no_grad()
def iter_tokens(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    sampling: SamplingParams | None = None,
    eos_token_ids: Sequence[int] = (),
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    compile: bool | str = "auto",
    pipeline: bool | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[torch.Tensor]:
    """Yield the next token of every row, (B,) int64 on the CPU, one step at a time; finished rows yield
    `pad_token_id`.

    A row finishes at one of `eos_token_ids` (which it yields) or once its text contains a stop string.
    pipeline: start each decoding step before waiting for the previous token to reach the host (None: on
    CUDA, where the GPU would otherwise idle while Python picks, checks and hands out every token; on the CPU
    nothing runs in parallel and the step after the last one would be wasted work).
    """
    if not is_own_model(model):
        yield from _iter_tokens_generic(
            model, input_ids, attention_mask, max_new_tokens=max_new_tokens, sampling=sampling,
            eos_token_ids=eos_token_ids, pad_token_id=pad_token_id, stop_strings=stop_strings,
            tokenizer=tokenizer, seed=seed, stats=stats)
        return
    if max_new_tokens <= 0:
        return
    sampling = sampling or SamplingParams()
    if stop_strings and tokenizer is None:
        raise ValueError("generate: stop_strings need a tokenizer to read the text")
    stats = stats if stats is not None else GenerationStats()
    vocab, _ = model.get_input_embeddings().weight.shape
    device = model.get_input_embeddings().weight.device
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.to(device).bool())
    check_left_padded(mask)
    pad = int(pad_token_id if pad_token_id is not None else (eos_token_ids[0] if eos_token_ids else 0))
    eos = [int(i) for i in eos_token_ids]
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop_check = _StopChecker(stop_strings, tokenizer) if stop_strings else None
    overlap = device.type == "cuda" if pipeline is None else pipeline
    penalty = sampling.repetition_penalty != 1.0

    compile = resolve_compile(model, compile)
    decoder = decoder_for(model, compile)
    static = decoder.buffers_for(model, B, bucket_length(T + max_new_tokens, compile))
    if penalty:  # the ids the penalty counts; nothing else reads them on the device
        seq = torch.full((B, T + max_new_tokens), pad, dtype=torch.long, device=device)  # prompt + new
        seq[:, :T] = input_ids
        seen = torch.zeros_like(seq, dtype=torch.bool)  # False for padding
        seen[:, :T] = mask
    finished = torch.zeros(B, dtype=torch.bool, device=device)
    positions = (mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T) real tokens counted from 0
    host = _HostCopies(B, device)
    new_ids = torch.empty(B, max_new_tokens, dtype=torch.long) if stop_check is not None else None

    with _reference_ops(model, decoder.mode == "compile"):
        t0 = time.perf_counter()
        out = model(input_ids, position_ids=positions, attention_mask=mask.long(),
                    kv_cache=static.start(mask), logits_to_keep=1)
        logits = out.logits[:, -1].float()  # (B, V)
        # The slot of the next token, kept on the device; the pad id fed by finished rows may lie outside
        # the embedding (-1), every id the head picks lies inside it.
        step = _Stepper(decoder, model, static, positions[:, -1:] + 1, torch.tensor([T], device=device),
                        vocab if not 0 <= pad < vocab else None)
        stats.prompt_tokens = T
        some_finished = False  # the host's view of `finished` after the previous step: exact, not a guess
        for i in range(max_new_tokens):
            cur = T + i
            if penalty:
                logits = process_logits(logits, sampling, seq[:, :cur], seen[:, :cur])
            else:
                logits = process_logits(logits, sampling)  # greedy: the logits as they are (no kernel)
            token = pick_next(logits, sampling, generator)  # a fresh (B,) tensor
            if some_finished:
                token.masked_fill_(finished, pad)
            if penalty:
                seq[:, cur] = token
                seen[:, cur] = ~finished
            if len(eos) == 1:
                finished |= token == eos[0]
            elif eos:
                finished |= torch.isin(token, eos_t)
            host.send(token, finished)
            last = i == max_new_tokens - 1
            if overlap and not last:
                # Queued behind the copies above, so the GPU runs it while the host waits for them. If this
                # token ends every row, its work is discarded: it writes only cache slot `cur` (< max_len,
                # as this is not the last step), which the next generation's prefill resets.
                logits = step(token)
            host_token, host_finished = host.receive()
            if stop_check is not None:
                new_ids[:, i] = host_token
                hit = stop_check(new_ids[:, :i + 1], host_finished)
                if bool(hit.any()):
                    host_finished |= hit
                    if not bool(host_finished.all()):
                        finished |= host.to_device(hit)  # queued before the next step's pick reads it
            done = bool(host_finished.all())
            some_finished = bool(host_finished.any())
            now = time.perf_counter()
            if i == 0:
                stats.prefill_s, t_first = now - t0, now
            else:
                stats.decode_s = now - t_first  # wall time from the first token: the caller's time counts
            stats.new_tokens = i + 1
            yield host_token
            if done or last:
                break
            if not overlap:
                logits = step(token)


class _Stepper:
    """Feeds one token per row to the decoder at each row's next position and the next cache slot."""

    def __init__(self, decoder: Any, model: Any, static: Any, next_pos: torch.Tensor, slot: torch.Tensor,
                 clamp_below: int | None) -> None:
        self.decoder, self.model, self.static = decoder, model, static
        self.next_pos, self.slot = next_pos, slot  # (B, 1), (1,) on the device
        self.clamp_below = clamp_below

    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """token (B,) -> the next logits (B, V); with CUDA graphs an output the next call overwrites."""
        if self.clamp_below is not None:
            token = token.clamp(0, self.clamp_below - 1)  # finished rows feed their pad id, e.g. -1
        logits = self.decoder(self.model, self.static, token[:, None], self.next_pos, self.slot)
        self.next_pos = self.next_pos + 1
        self.slot = self.slot + 1
        return logits


class _HostCopies:
    """Each step's tokens and finished flags on their way to the host.

    On CUDA: copies into pinned buffers, started without waiting and followed by an event, so that the
    caller can queue more GPU work before it waits (`receive` waits for the event only, which precedes that
    work in stream order). On the CPU the tensors are the host's already.
    """

    def __init__(self, batch_size: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        if self.cuda:
            self.token = torch.empty(batch_size, dtype=torch.long, pin_memory=True)
            self.finished = torch.empty(batch_size, dtype=torch.bool, pin_memory=True)
            self.ready = torch.cuda.Event()

    def send(self, token: torch.Tensor, finished: torch.Tensor) -> None:
        if self.cuda:
            self.token.copy_(token, non_blocking=True)
            self.finished.copy_(finished, non_blocking=True)
            self.ready.record(torch.cuda.current_stream(self.device))
        else:
            self.token, self.finished = token, finished.clone()  # `finished` changes in place later

    def receive(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(token, finished) on the host as sent, in tensors of their own (the buffers are reused)."""
        if self.cuda:
            self.ready.synchronize()
            return self.token.clone(), self.finished.clone()
        return self.token, self.finished

    def to_device(self, t: torch.Tensor) -> torch.Tensor:
        # Through pinned memory: a copy from pageable memory would wait for the queued step first.
        return t.pin_memory().to(self.device, non_blocking=True) if self.cuda else t


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    eos_token_ids: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop_strings: Sequence[str] | None = None,
    tokenizer: Any = None,
    seed: int | None = None,
    streamer: Any = None,
    compile: bool | str = "auto",
    pipeline: bool | None = None,
    min_p: float = 0.0,
    stats: GenerationStats | None = None,
) -> torch.Tensor:
    """Prompt + generated ids, (B, T + n), like transformers' `generate`; rows that finish early are padded.

    input_ids: (B, T) left-padded when B > 1, with `attention_mask` (B, T) of 1/0.
    eos_token_ids: None takes the tokenizer's EOS; [] runs to `max_new_tokens`.
    compile: 'auto' (default) records the decoding step into a CUDA graph for a 16-bit model on a GPU and
    runs it eagerly otherwise; True compiles the one-token step with torch.compile (CUDA graphs on a GPU;
    the first call compiles); 'cuda_graph' records the eager step (our Triton kernels included) into a
    CUDA graph; False runs it eagerly.
    streamer: anything with `put(tensor)` / `end()` (transformers' TextStreamer): it gets the prompt, then
    each step's (B,) tokens.
    pipeline: queue each decoding step before the previous token reaches the host (None: on CUDA; False
    waits for every token first, the loop as it was, kept to measure the difference).
    min_p: with do_sample, keep only tokens at least min_p times as likely as the most likely (0: all).
    """
    sampling = SamplingParams(do_sample, temperature, top_p, top_k, repetition_penalty, min_p)
    eos = resolve_eos(eos_token_ids, tokenizer)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    steps = []
    tokens = iter_tokens(model, input_ids, attention_mask, max_new_tokens=max_new_tokens, sampling=sampling,
                         eos_token_ids=eos, pad_token_id=pad_token_id, stop_strings=stop_strings,
                         tokenizer=tokenizer, seed=seed, compile=compile, pipeline=pipeline, stats=stats)
    for token in tokens:
        steps.append(token)
        if streamer is not None:
            streamer.put(token.cpu())
    if streamer is not None:
        streamer.end()
    new = torch.stack(steps, dim=1) if steps else input_ids.new_zeros((input_ids.shape[0], 0))
    return torch.cat([input_ids, new.to(input_ids.device)], dim=1)


class _StopChecker:
    """Which unfinished rows' generated text now contains a stop string (decodes a short tail per row)."""

    def __init__(self, stop_strings: Sequence[str], tokenizer: Any) -> None:
        self.stops = [s for s in stop_strings if s]
        self.tokenizer = tokenizer
        # A token is at least one byte, so a stop string lies within its length (+ a partial char) of tokens.
        self.tail = max(len(s.encode()) for s in self.stops) + 4 if self.stops else 0

    def __call__(self, new_ids: torch.Tensor, finished: torch.Tensor) -> torch.Tensor:
        hit = torch.zeros_like(finished)
        if not self.stops:
            return hit
        rows = new_ids[:, -self.tail:].tolist()
        for b, done in enumerate(finished.tolist()):
            if not done:
                text = self.tokenizer.decode(rows[b], skip_special_tokens=False)
                hit[b] = any(s in text for s in self.stops)
        return hit


class _reference_ops:
    """While compiled: run the PyTorch references of our kernels (inductor fuses those itself) instead of
    hand-written Triton launches inside the traced graph; restore the flags after."""

    def __init__(self, model: torch.nn.Module, active: bool) -> None:
        self.model, self.active, self.saved = model, active, []

    def __enter__(self) -> None:
        if self.active:
            for m in self.model.modules():
                if isinstance(getattr(m, "use_kernels", None), bool):
                    self.saved.append((m, m.use_kernels))
                    m.use_kernels = False

    def __exit__(self, *exc: object) -> None:
        for m, flag in self.saved:
            m.use_kernels = flag
        self.saved.clear()


# ---------------------------------------------------------------- the generic path


class _QueueStreamer:
    """A transformers streamer that hands each step's tokens to another thread (the prompt is skipped)."""

    _END = object()

    def __init__(self) -> None:
        self.queue: Queue = Queue()
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.queue.put(value.reshape(-1).clone())

    def end(self) -> None:
        self.queue.put(self._END)


def hf_model_of(model: Any) -> Any:
    """The transformers (or PEFT) model under a generic wrapper, or the model itself."""
    for name in ("hf_model", "peft_model", "inner"):
        inner = getattr(model, name, None)
        if inner is not None and hasattr(inner, "generate"):
            return inner
    if hasattr(model, "generate"):
        return model
    raise TypeError(f"generate: {type(model).__name__} is neither our Llama model nor a transformers model")


def hf_generate_kwargs(sampling: SamplingParams, max_new_tokens: int, eos: Sequence[int], pad: int | None,
                       stop_strings: Sequence[str] | None, tokenizer: Any) -> dict[str, Any]:
    """transformers' generate arguments for our sampling settings (every default spelled out, so a model's
    generation_config cannot quietly change them)."""
    kw: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=sampling.do_sample,
        repetition_penalty=sampling.repetition_penalty,
        eos_token_id=list(eos) or None, pad_token_id=pad if pad is not None else (eos[0] if eos else None),
        num_beams=1,
    )
    if sampling.do_sample:
        kw.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                  min_p=sampling.min_p or None)
    else:
        kw.update(temperature=None, top_p=None, top_k=None, min_p=None)
    if stop_strings:
        kw.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    return kw


def _iter_tokens_generic(model, input_ids, attention_mask, *, max_new_tokens, sampling, eos_token_ids,
                         pad_token_id, stop_strings, tokenizer, seed, stats) -> Iterator[torch.Tensor]:
    """transformers' generate in a worker thread, its tokens passed back through a queue as they come."""
    hf = hf_model_of(model)
    device = next(hf.parameters()).device
    kw = hf_generate_kwargs(sampling, max_new_tokens, eos_token_ids, pad_token_id, stop_strings, tokenizer)
    streamer = _QueueStreamer()
    errors: list[BaseException] = []
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = input_ids.shape[1]

    def work() -> None:
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                if seed is not None:
                    torch.manual_seed(seed)
                hf.generate(input_ids=input_ids.to(device),
                            attention_mask=None if attention_mask is None else attention_mask.to(device),
                            streamer=streamer, **kw)
        except BaseException as e:  # re-raised in the caller's thread
            errors.append(e)
            streamer.end()

    t0 = time.perf_counter()
    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    n = 0
    while (item := streamer.queue.get()) is not _QueueStreamer._END:
        n += 1
        stats.new_tokens = n
        if n == 1:
            stats.prefill_s = time.perf_counter() - t0
        else:
            stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
        yield item
    worker.join()
    if errors:
        raise errors[0]


__all__ = ["GenerationStats", "SamplingParams", "generate", "iter_tokens", "resolve_eos"]
