"""One decoding step of our Llama-family model over a static KV cache, in a form torch.compile and CUDA
graphs take.

The model's own forward grows its cache views with a Python length (new shapes every token); here every
tensor keeps its shape from step to step: the step attends over all `max_len` slots, hides empty and
padded slots with a (B, max_len) key mask, and writes the new key/value at a slot given as a tensor.
Worked example, prompts `a b c` and `d e`, max_len 6, at the second decoding step (slot 4):
```
slot          0    1    2    3    4    5
row 0 keys    a    b    c    x    y    .      key_mask 1 1 1 1 1 0
row 1 keys    pad  d    e    x'   y'   .      key_mask 0 1 1 1 1 0
```
The prefill still runs the model's forward (one call, any length) into the same buffers.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn

from fasttune.models.attention import AttentionMask
from fasttune.models.kv_cache import KVCache


class StaticKV(nn.Module):
    """The cache buffers of one generation shape (batch, max_len), kept across calls so that a compiled
    step (and its CUDA graph) sees the same addresses every time.

    k, v: (L, B, n_kv, max_len, hd) shared with `kv_cache` (the prefill writes through it);
    key_mask: (B, max_len) bool, True for slots a query may read.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int) -> None:
        super().__init__()
        self.kv_cache = KVCache.for_model(model, batch_size, max_len)
        self.register_buffer("k", self.kv_cache.k, persistent=False)
        self.register_buffer("v", self.kv_cache.v, persistent=False)
        mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=self.k.device)
        self.register_buffer("key_mask", mask, persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def start(self, prompt_mask: torch.Tensor) -> KVCache:
        """Forget earlier contents; mark the prompt's real slots; return the cache for the prefill."""
        self.kv_cache.reset()
        self.key_mask.zero_()
        self.key_mask[:, : prompt_mask.shape[1]] = prompt_mask.bool()
        return self.kv_cache


class _Slots:
    """What an attention layer calls `kv_cache`: write this step's k/v at `pos`, return every slot."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        self.k, self.v, self.pos = k, v, pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, n_kv, 1, hd) written at slot `pos` of (B, n_kv, max_len, hd)
        self.k[layer].index_copy_(2, self.pos, k)
        self.v[layer].index_copy_(2, self.pos, v)
        return self.k[layer], self.v[layer]


def decode_step(
    model: nn.Module,
    static: StaticKV,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    slot: torch.Tensor,
) -> torch.Tensor:
    """Feed one token per row; return the next-token logits (B, V) in fp32.

    input_ids, position_ids: (B, 1); slot: (1,) int64, the cache slot this token fills.
    """
    inner = model.model
    static.key_mask.index_fill_(1, slot, True)
    keys = static.key_mask  # (B, max_len)
    window = model.config.sliding_window
    if window is not None:
        # Mistral: slots more than `window` behind this one fall out of view.
        idx = torch.arange(keys.shape[1], device=keys.device)
        keys = keys & (idx > slot - window)[None]
    mask = AttentionMask(causal=False, mask=keys[:, None, None, :])  # (B, 1, 1, max_len)
    x = inner.embed_tokens(input_ids)  # (B, 1, H)
    rope = inner.rotary_emb(position_ids, x.dtype)
    slots = _Slots(static.k, static.v, slot)
    for i, layer in enumerate(inner.layers):
        x = layer(x, rope, mask, slots, i)
    return model.lm_head(inner.norm(x))[:, -1].float()  # (B, V)


MODES = ("eager", "compile", "cuda_graph")


def decode_mode(compile: bool | str | None) -> str:
    """generate's `compile` argument -> 'eager', 'compile' (torch.compile; CUDA graphs on a GPU) or
    'cuda_graph' (the eager step, kernels as they are, captured once in a CUDA graph and replayed)."""
    if compile in (False, None, "eager"):
        return "eager"
    if compile in (True, "compile"):
        return "compile"
    if compile == "cuda_graph":
        return "cuda_graph"
    raise ValueError(f"compile={compile!r}: expected False, True ('compile') or 'cuda_graph'")


class Decoder:
    """The step function for one model, with the cache buffers it was built or captured for.

    eager: `decode_step` as it is. compile: torch.compile of it (reduce-overhead = CUDA graphs on a GPU:
    at batch 1 a token is hundreds of small kernels, and launching them one by one costs more than running
    them). cuda_graph: the eager step recorded once per cache shape into a torch.cuda.CUDAGraph; each token
    copies its three small inputs into the graph's input tensors and replays it.
    """

    def __init__(self, model: nn.Module, mode: str) -> None:
        if mode not in MODES:
            raise ValueError(f"decode mode {mode!r}: expected one of {MODES}")
        on_cuda = model.get_input_embeddings().weight.is_cuda
        if mode == "cuda_graph" and not on_cuda:
            raise ValueError("compile='cuda_graph' needs the model on a CUDA device")
        self.mode = mode
        self.cuda_graphs = on_cuda and mode != "eager"
        self.static: StaticKV | None = None
        self.weights: tuple[int, ...] = ()
        self.fn: Callable = decode_step
        if mode == "compile":
            compile_mode = "reduce-overhead" if on_cuda else "default"
            self.fn = torch.compile(decode_step, mode=compile_mode, fullgraph=True, dynamic=False)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_io: tuple[torch.Tensor, ...] = ()

    def buffers_for(self, model: nn.Module, batch_size: int, max_len: int) -> StaticKV:
        """Reuse the buffers when shape, dtype and weights match (no retrace, no recapture)."""
        if self.mode == "eager":
            return StaticKV(model, batch_size, max_len)  # nothing to keep alive between calls
        emb = model.get_input_embeddings().weight
        # A captured graph reads weights by address: moving or reloading the model must recapture.
        weights = tuple(p.data_ptr() for p in model.parameters())
        s = self.static
        if s is None or s.k.shape[1] != batch_size or s.max_len != max_len or s.k.dtype != emb.dtype \
                or s.k.device != emb.device or weights != self.weights:
            self.static, self.graph, self.weights = None, None, weights
            self.static = s = StaticKV(model, batch_size, max_len)
        return s

    def __call__(self, model, static, input_ids, position_ids, slot) -> torch.Tensor:
        if self.mode == "cuda_graph":
            return self._replay(model, static, input_ids, position_ids, slot)
        if self.mode == "compile" and self.cuda_graphs:
            # The previous step's outputs live in the graph's memory pool; we are done with them.
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(model, static, input_ids, position_ids, slot)

    def _replay(self, model, static, input_ids, position_ids, slot) -> torch.Tensor:
        if self.graph is None:
            self._capture(model, static, input_ids, position_ids, slot)
        ids, pos, at, out = self.graph_io
        ids.copy_(input_ids)
        pos.copy_(position_ids)
        at.copy_(slot)
        self.graph.replay()
        return out  # overwritten by the next replay; the caller is done with it by then

    def _capture(self, model, static, input_ids, position_ids, slot) -> None:
        """Warm up on a side stream (Triton kernels compile and load there), then record one step.

        The warm-up steps run for real at this step's slot with this step's token, so they write exactly
        what the replay that follows writes again.
        """
        ids, pos, at = input_ids.clone(), position_ids.clone(), slot.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                decode_step(model, static, ids, pos, at)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = decode_step(model, static, ids, pos, at)
        self.graph, self.graph_io = graph, (ids, pos, at, out)


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model: nn.Module, compile: bool | str) -> Decoder:
    """The cached Decoder of `model` (compiled ones are worth keeping: compiling takes seconds to minutes)."""
    mode = decode_mode(compile)
    per_model = _DECODERS.setdefault(model, {})
    if mode not in per_model:
        per_model[mode] = Decoder(model, mode)
    return per_model[mode]


def bucket_length(n: int, compile: bool | str, step: int = 256) -> int:
    """Cache length for n slots: exact when eager; rounded up when compiled or captured, so that few shapes
    are ever compiled or recorded."""
    return n if decode_mode(compile) == "eager" else -(-n // step) * step
