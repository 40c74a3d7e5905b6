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


class Decoder:
    """The step function for one model: eager, or compiled once and reused, with its cache buffers."""

    def __init__(self, model: nn.Module, compile: bool) -> None:
        self.compile = compile
        self.cuda_graphs = False
        self.static: StaticKV | None = None
        self.fn: Callable = decode_step
        if compile:
            emb = model.get_input_embeddings().weight
            # reduce-overhead = CUDA graphs: at batch 1 a token is ~400 small kernels, and launching them
            # one by one costs more than running them.
            self.cuda_graphs = emb.is_cuda
            mode = "reduce-overhead" if self.cuda_graphs else "default"
            self.fn = torch.compile(decode_step, mode=mode, fullgraph=True, dynamic=False)

    def buffers_for(self, model: nn.Module, batch_size: int, max_len: int) -> StaticKV:
        """Reuse the buffers when the shape and dtype match (a compiled step then runs without retracing)."""
        if not self.compile:
            return StaticKV(model, batch_size, max_len)  # eager: nothing to keep alive between calls
        emb = model.get_input_embeddings().weight
        s = self.static
        if s is None or s.k.shape[1] != batch_size or s.max_len != max_len or s.k.dtype != emb.dtype \
                or s.k.device != emb.device:
            self.static = s = StaticKV(model, batch_size, max_len)
        return s

    def __call__(self, model, static, input_ids, position_ids, slot) -> torch.Tensor:
        if self.cuda_graphs:
            # The previous step's outputs live in the graph's memory pool; we are done with them.
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(model, static, input_ids, position_ids, slot)


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model: nn.Module, compile: bool) -> Decoder:
    """The cached Decoder of `model` (compiled ones are worth keeping: compiling takes seconds to minutes)."""
    per_model = _DECODERS.setdefault(model, {})
    if compile not in per_model:
        per_model[compile] = Decoder(model, compile)
    return per_model[compile]


def bucket_length(n: int, compile: bool, step: int = 256) -> int:
    """Cache length for n slots: exact when eager; rounded up when compiled so few shapes ever compile."""
    return n if not compile else -(-n // step) * step
