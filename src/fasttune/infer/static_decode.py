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

`slot` is either one cache column shared by every row, (1,), as `generate` uses it, or one column per row,
(B,), as the server's continuous batching uses it: there each row holds its own sequence from column 0, so
a row's column is its position, and rows of different lengths step together.

Two steps: `decode_step` runs the model's own layers; `fused_decode_step` (the default of the compiled and
CUDA-graph modes on a GPU) runs the same math with fewer, larger kernels: q/k/v as one GEMV and gate/up as
one over weights packed by `decode_weights.py`, the residual added inside the o/down GEMVs, one additive
key mask per step shared by all layers, and grouped-query attention without repeating K/V.

In the compiled and CUDA-graph modes the cache also holds the rotary cos/sin of every position it can
reach, computed once per cache shape, so a step gathers two rows instead of computing them.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fasttune.infer.decode_weights import DecodeWeights, dense_base, pack_decode_weights
from fasttune.kernels.rope import apply_rope, apply_rope_reference
from fasttune.kernels.scratch import keep_scratch
from fasttune.kernels.swiglu import swiglu, swiglu_reference
from fasttune.lora.layer import LoRALinear
from fasttune.models.attention import AttentionMask
from fasttune.models.kv_cache import KVCache


class StaticKV(nn.Module):
    """The cache buffers of one generation shape (batch, max_len), kept across calls so that a compiled
    step (and its CUDA graph) sees the same addresses every time.

    k, v: (L, B, n_kv, max_len, hd) shared with `kv_cache` (the prefill writes through it);
    key_mask: (B, max_len) bool, True for slots a query may read;
    rope_cos, rope_sin: (max_len, hd) in the activations' dtype with `rope_table`, else None: the rotary
    tables of every position the cache can hold, computed once here instead of in every step.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, rope_table: bool = False) -> None:
        super().__init__()
        self.kv_cache = KVCache.for_model(model, batch_size, max_len)
        self.register_buffer("k", self.kv_cache.k, persistent=False)
        self.register_buffer("v", self.kv_cache.v, persistent=False)
        mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=self.k.device)
        self.register_buffer("key_mask", mask, persistent=False)
        # Buffers of this module, like k/v: a captured graph (or torch.compile's) reads them at a fixed
        # address for as long as these buffers live, which is as long as the graph does.
        cos, sin = rope_tables(model, max_len) if rope_table else (None, None)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def start(self, prompt_mask: torch.Tensor) -> KVCache:
        """Forget earlier contents; mark the prompt's real slots; return the cache for the prefill."""
        self.kv_cache.reset()
        self.key_mask.zero_()
        self.key_mask[:, : prompt_mask.shape[1]] = prompt_mask.bool()
        return self.kv_cache


def rope_tables(model: nn.Module, max_len: int) -> tuple[torch.Tensor, torch.Tensor] | tuple[None, None]:
    """cos/sin (max_len, hd) of positions 0..max_len-1 from the model's own rotary module, or (None, None)
    where one table cannot serve every step (dynamic NTK scaling changes the frequencies with the length).

    A position never exceeds its cache slot (positions count a row's real tokens), so max_len rows cover
    every step of a generation that fits the cache.
    """
    rotary = model.model.rotary_emb
    scaling = rotary.rope_scaling
    if scaling is not None and scaling["rope_type"] == "dynamic" and max_len > rotary.max_position_embeddings:
        return None, None
    emb = model.get_input_embeddings().weight
    positions = torch.arange(max_len, device=emb.device)[None]  # (1, max_len)
    cos, sin = rotary(positions, emb.dtype)  # (1, max_len, hd) each
    return cos[0], sin[0]


def step_rope(
    model: nn.Module, static: StaticKV, position_ids: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (B, 1, hd) for this step's positions: rows of the cache's tables when it has them (one
    gather each), else computed by the rotary module (frequencies, cat, cos, sin and casts every step)."""
    if static.rope_cos is not None and static.rope_cos.dtype == dtype:
        return F.embedding(position_ids, static.rope_cos), F.embedding(position_ids, static.rope_sin)
    return model.model.rotary_emb(position_ids, dtype)


def write_slot(buf: torch.Tensor, slot: torch.Tensor, kv: torch.Tensor) -> None:
    """kv (B, n_kv, 1, hd) into column `slot` of buf (B, n_kv, max_len, hd): one shared column (1,), or
    row b's own column slot[b] when slot is (B,)."""
    if slot.numel() == 1:
        buf.index_copy_(2, slot, kv)
    else:  # a scatter takes no host value, so a CUDA graph can capture it
        b, n_kv, _, hd = kv.shape
        buf.scatter_(2, slot.view(b, 1, 1, 1).expand(b, n_kv, 1, hd), kv)  # kv[b] at (b, :, slot[b])


class _Slots:
    """What an attention layer calls `kv_cache`: write this step's k/v at `pos`, return every slot."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> None:
        self.k, self.v, self.pos = k, v, pos

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # k, v: (B, n_kv, 1, hd) written at slot `pos` of (B, n_kv, max_len, hd)
        write_slot(self.k[layer], self.pos, k)
        write_slot(self.v[layer], self.pos, v)
        return self.k[layer], self.v[layer]


def visible_keys(static: StaticKV, slot: torch.Tensor, window: int | None) -> torch.Tensor:
    """Mark `slot` filled and return the (B, max_len) bool mask of the slots this step's query may read."""
    keys = static.key_mask  # (B, max_len)
    if slot.numel() == 1:
        keys.index_fill_(1, slot, True)
    else:
        keys.scatter_(1, slot.view(-1, 1), True)  # (b, slot[b]); a scalar fill, capturable in a CUDA graph
    if window is not None:
        # Mistral: slots more than `window` behind this one fall out of view.
        idx = torch.arange(keys.shape[1], device=keys.device)
        keys = keys & (idx[None] > slot.view(-1, 1) - window)  # (B or 1, max_len) broadcast over rows
    return keys


def decode_step(
    model: nn.Module,
    static: StaticKV,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    slot: torch.Tensor,
) -> torch.Tensor:
    """Feed one token per row; return the next-token logits (B, V) in fp32.

    input_ids, position_ids: (B, 1); slot: (1,) or (B,) int64, the cache slot this token fills (every row's,
    or each row's own).
    """
    inner = model.model
    keys = visible_keys(static, slot, model.config.sliding_window)
    mask = AttentionMask(causal=False, mask=keys[:, None, None, :])  # (B, 1, 1, max_len)
    x = inner.embed_tokens(input_ids)  # (B, 1, H)
    rope = step_rope(model, static, position_ids, x.dtype)
    slots = _Slots(static.k, static.v, slot)
    for i, layer in enumerate(inner.layers):
        x = layer(x, rope, mask, slots, i)
    return model.lm_head(inner.norm(x))[:, -1].float()  # (B, V)


def key_bias(keys: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, max_len) bool -> (B, 1, 1, max_len) additive mask (0 or -inf) in `dtype`, built once per step.

    SDPA turns a bool mask into a float one inside every call (two kernels per layer); every layer of one
    step shares this one instead. Rows start at multiples of 16 elements, the alignment the memory-efficient
    kernel wants (it would copy the mask otherwise).
    """
    B, L = keys.shape
    width = -(-L // 16) * 16
    bias = torch.full((B, 1, 1, width), float("-inf"), dtype=dtype, device=keys.device)
    return bias[..., :L].masked_fill_(keys[:, None, None, :], 0.0)


def _add_projected(residual: torch.Tensor, proj: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """residual + proj(y). For a plain (or merged) bias-free linear layer: one in-place addmm_ into
    `residual` (a fresh tensor of this step that nothing else reads), which adds the residual in the GEMV's
    epilogue (beta = 1) and rounds once. Out of place, addmm would first copy `residual` into its output:
    the same two kernels as a GEMV and an add."""
    base = dense_base(proj)
    plain = not isinstance(proj, LoRALinear) or proj.merged
    if base is None or base.bias is not None or not plain or base.weight.dtype != residual.dtype:
        return residual + proj(y)
    H = residual.shape[-1]
    residual.view(-1, H).addmm_(y.reshape(-1, y.shape[-1]), base.weight.t())  # (B, H) += (B, in) @ (in, H)
    return residual


def _fused_attention(layer: nn.Module, packed, x, rope, bias, static: StaticKV, slot, i: int) -> torch.Tensor:
    """x + self_attn(input_layernorm(x)) for one token per row. x: (B, 1, H)."""
    a = layer.self_attn
    B = x.shape[0]
    nh, nkv, hd = a.n_heads, a.n_kv_heads, a.head_dim
    h = layer.input_layernorm(x)
    projs = (a.q_proj, a.k_proj, a.v_proj)
    q, k, v = packed(h, projs) if packed is not None else [p(h) for p in projs]
    q = q.view(B, 1, nh, hd)  # (B, 1, nh, hd)
    k = k.view(B, 1, nkv, hd)  # (B, 1, nkv, hd)
    v = v.view(B, 1, nkv, hd)  # (B, 1, nkv, hd)
    if a.qk_norm:
        q, k = a.q_norm(q), a.k_norm(k)
    q, k = (apply_rope if a.use_kernels else apply_rope_reference)(q, k, *rope)
    write_slot(static.k[i], slot, k.transpose(1, 2))  # (B, nkv, 1, hd) into slot of (B, nkv, max_len, hd)
    write_slot(static.v[i], slot, v.transpose(1, 2))
    # Grouped-query attention for a single query: the `nh / nkv` query heads that share a KV head become
    # that head's query rows (head h = kv * group + j, as repeat_kv numbers them), so SDPA reads each KV
    # head once and nothing repeats K/V over all max_len slots; the (B, 1, 1, max_len) mask broadcasts.
    q = q.reshape(B, nkv, nh // nkv, hd)  # (B, nkv, group, hd)
    y = F.scaled_dot_product_attention(q, static.k[i], static.v[i], attn_mask=bias)  # (B, nkv, group, hd)
    y = y.reshape(B, 1, nh * hd)  # (B, 1, nh * hd)
    return _add_projected(x, a.o_proj, y)


def _fused_mlp(layer: nn.Module, packed, x: torch.Tensor) -> torch.Tensor:
    """x + mlp(post_attention_layernorm(x)). x: (B, 1, H)."""
    m = layer.mlp
    h = layer.post_attention_layernorm(x)
    projs = (m.gate_proj, m.up_proj)
    gate, up = packed(h, projs) if packed is not None else [p(h) for p in projs]  # (B, 1, I) each
    act = (swiglu if m.use_kernels else swiglu_reference)(gate, up)
    return _add_projected(x, m.down_proj, act)


def fused_decode_step(
    model: nn.Module,
    static: StaticKV,
    input_ids: torch.Tensor,
    position_ids: torch.Tensor,
    slot: torch.Tensor,
    packed: DecodeWeights,
) -> torch.Tensor:
    """`decode_step` with the layers unrolled for one token: the same logits (B, V) in fp32, fewer kernels.

    The math is the layers' own (norm modules, qk-norm, RoPE, LoRA terms of unmerged adapters); only the
    grouping differs: packed q/k/v and gate/up products, residual adds inside addmm, one shared mask.
    """
    inner = model.model
    keys = visible_keys(static, slot, model.config.sliding_window)
    x = inner.embed_tokens(input_ids)  # (B, 1, H)
    rope = step_rope(model, static, position_ids, x.dtype)
    bias = key_bias(keys, static.k.dtype)
    for i, layer in enumerate(inner.layers):
        x = _fused_attention(layer, packed.qkv[i], x, rope, bias, static, slot, i)
        x = _fused_mlp(layer, packed.gate_up[i], x)
    return model.lm_head(inner.norm(x))[:, -1].float()  # (B, V)


MODES = ("eager", "compile", "cuda_graph")
# generate's `compile` -> (mode, fused): None = fused on a GPU (where it was measured to pay), the eager
# step elsewhere; the '-unfused' spellings force the model's own step (benchmarks, a fallback).
_COMPILE_ARGS = {
    "eager": ("eager", False), "compile": ("compile", None), "cuda_graph": ("cuda_graph", None),
    "compile-unfused": ("compile", False), "cuda_graph-unfused": ("cuda_graph", False),
    "compile-fused": ("compile", True), "cuda_graph-fused": ("cuda_graph", True),
}


def resolve_compile(model: nn.Module, compile: bool | str | None) -> bool | str | None:
    """'auto' -> 'cuda_graph' for a 16-bit model on a CUDA device (measured fastest there), else eager.

    A bitsandbytes 4/8-bit base stays eager: its batch-1 kernels were not validated under graph capture.
    Any other value passes through unchanged.
    """
    if compile != "auto":
        return compile
    from fasttune.lora.layer import is_quantized

    on_cuda = model.get_input_embeddings().weight.is_cuda
    quantized = any(is_quantized(m) for m in model.modules())
    return "cuda_graph" if on_cuda and not quantized else False


def decode_variant(compile: bool | str | None) -> tuple[str, bool | None]:
    """generate's `compile` argument -> (mode, fused). Modes: 'eager', 'compile' (torch.compile; CUDA graphs
    on a GPU) or 'cuda_graph' (the step, kernels as they are, captured once in a CUDA graph and replayed).
    fused: True/False forces `fused_decode_step` / `decode_step`; None picks fused on CUDA.
    """
    if compile is None or compile is False:
        return "eager", False
    if compile is True:
        return "compile", None
    if isinstance(compile, str) and compile in _COMPILE_ARGS:
        return _COMPILE_ARGS[compile]
    raise ValueError(f"compile={compile!r}: expected False, True ('compile'), 'cuda_graph', or "
                     "'compile-unfused' / 'cuda_graph-unfused' (the model's own layers in the step)")


def decode_mode(compile: bool | str | None) -> str:
    """generate's `compile` argument -> 'eager', 'compile' or 'cuda_graph' (see `decode_variant`)."""
    return decode_variant(compile)[0]


class Decoder:
    """The step function for one model, with the cache buffers it was built or captured for.

    eager: `decode_step` as it is. compile: torch.compile of the step (reduce-overhead = CUDA graphs on a
    GPU: at batch 1 a token is hundreds of small kernels, and launching them one by one costs more than
    running them). cuda_graph: the eager step recorded once per cache shape into a torch.cuda.CUDAGraph; each
    token copies its three small inputs into the graph's input tensors and replays it. With `fused` the step
    is `fused_decode_step`, and the model's q/k/v and gate/up weights are packed (`decode_weights.py`) the
    first time buffers are asked for.
    """

    def __init__(self, model: nn.Module, mode: str, fused: bool | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"decode mode {mode!r}: expected one of {MODES}")
        on_cuda = model.get_input_embeddings().weight.is_cuda
        if mode == "cuda_graph" and not on_cuda:
            raise ValueError("compile='cuda_graph' needs the model on a CUDA device")
        self.mode = mode
        self.fused = mode != "eager" and (on_cuda if fused is None else fused)
        self.cuda_graphs = on_cuda and mode != "eager"
        if self.cuda_graphs:
            keep_scratch()  # a graph replays kernels that write scratch tensors at the addresses it recorded
        self.static: StaticKV | None = None
        self.weights: tuple[int, ...] = ()
        self.packed: DecodeWeights | None = None
        self.step: Callable = fused_decode_step if self.fused else decode_step
        self.fn: Callable = self.step
        if mode == "compile":
            compile_mode = "reduce-overhead" if on_cuda else "default"
            self.fn = torch.compile(self.step, mode=compile_mode, fullgraph=True, dynamic=False)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.graph_io: tuple[torch.Tensor, ...] = ()

    def buffers_for(self, model: nn.Module, batch_size: int, max_len: int) -> StaticKV:
        """Reuse the buffers when shape, dtype and weights match (no retrace, no recapture)."""
        if self.mode == "eager":
            return StaticKV(model, batch_size, max_len)  # nothing to keep alive between calls
        emb = model.get_input_embeddings().weight
        # A captured graph reads weights by address: moving or reloading the model must recapture.
        weights = tuple(p.data_ptr() for p in model.parameters())
        if self.fused and weights != self.weights:
            # New or moved weights (first call, adapters attached, model reloaded): pack them (a no-op copy
            # for groups still packed), then take the addresses they have now.
            self.packed = pack_decode_weights(model)
            weights = tuple(p.data_ptr() for p in model.parameters())
            if self.mode == "compile":
                self._mark_static(self.packed)
        s = self.static
        if s is None or s.k.shape[1] != batch_size or s.max_len != max_len or s.k.dtype != emb.dtype \
                or s.k.device != emb.device or weights != self.weights:
            self.static, self.graph, self.weights = None, None, weights
            self.static = s = StaticKV(model, batch_size, max_len, rope_table=True)
        return s

    @staticmethod
    def _mark_static(packed: DecodeWeights) -> None:
        """Tell torch.compile the packed weights keep their address (they are Parameters, which it already
        takes as static; said explicitly because copying them into CUDA-graph input buffers would cost a
        full weight read and write per token)."""
        for group in packed.qkv + packed.gate_up:
            if group is not None:
                for t in group.parameters():
                    torch._dynamo.mark_static_address(t, guard=False)

    def _args(self) -> tuple:
        return (self.packed,) if self.fused else ()

    def __call__(self, model, static, input_ids, position_ids, slot) -> torch.Tensor:
        if self.mode == "cuda_graph":
            return self._replay(model, static, input_ids, position_ids, slot)
        if self.mode == "compile" and self.cuda_graphs:
            # The previous step's outputs live in the graph's memory pool; we are done with them.
            torch.compiler.cudagraph_mark_step_begin()
        return self.fn(model, static, input_ids, position_ids, slot, *self._args())

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
                self.step(model, static, ids, pos, at, *self._args())
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.step(model, static, ids, pos, at, *self._args())
        self.graph, self.graph_io = graph, (ids, pos, at, out)


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(model: nn.Module, compile: bool | str) -> Decoder:
    """The cached Decoder of `model` (compiled ones are worth keeping: compiling takes seconds to minutes)."""
    mode, fused = decode_variant(compile)
    per_model = _DECODERS.setdefault(model, {})
    if (mode, fused) not in per_model:
        per_model[mode, fused] = Decoder(model, mode, fused)
    return per_model[mode, fused]


def bucket_length(n: int, compile: bool | str, step: int = 256) -> int:
    """Cache length for n slots: exact when eager; rounded up when compiled or captured, so that few shapes
    are ever compiled or recorded."""
    return n if decode_mode(compile) == "eager" else -(-n // step) * step
