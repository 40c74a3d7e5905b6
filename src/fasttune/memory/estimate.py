"""Peak GPU memory of a LoRA/QLoRA training step of our Llama model, estimated before anything is allocated
from the step's `MemoryPlan`, and the number of layers that may keep their activations ('selective'
checkpointing) within a budget.

The estimate adds four parts (bytes; N = batch x seq tokens, e = bytes per activation element):
    weights      16-bit tensors, or NF4 (half a byte per element plus block scales) for 4-bit linears
    adapters     LoRA A and B in fp32, their gradients, and the optimiser state (8-bit AdamW: 2 bytes/param)
    activations  what stays on the GPU between the forward and the backward: each recomputed layer's input
                 x (N H e; when offloaded, two layers' only: x, and x_mid, the kept attention output and
                 q, k, v in halves; whole layers past the host rule's room keep x on the GPU), gate/up
                 the plan keeps, all saved tensors of each kept layer, the loss gradient
    working      one layer's recompute and backward at once (its saved tensors, plus the MLP backward's
                 (N, intermediate) buffer and a few (N, H) gradients; with recompute in halves, only the
                 MLP half's), or one chunk of loss logits
Saved tensors of one layer on the fused path (`use_kernels`, per token, in elements of e bytes):
    x_in H, norm1(x) H, q k v (nh + 2 nkv) hd, attention output nh hd, x_mid H, norm2(x) H, gate/up 2 I,
    the rank-r adapter products 7 r, plus fp32 rstd and attention log-sum-exp (4 (2 + nh) bytes).
The unfused reference path keeps more (the SwiGLU output and its input, fp32 norm copies); it is estimated
with the same formula plus those tensors and is only a rough guide.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fasttune.memory.plan import MemoryPlan, ModelShape, plan_memory
from fasttune.memory.settings import Checkpointing

if TYPE_CHECKING:
    from fasttune.models.llama import LlamaConfig

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OPTIMIZER_BYTES = {"adamw_8bit": 2.0 + 8 / 256, "adamw_torch": 8.0}  # state bytes per trained parameter
GiB = 2**30


def _linear_shapes(c: LlamaConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of each linear of one decoder layer, by its HF name."""
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    H, Inter = c.hidden_size, c.intermediate_size
    return {"q_proj": (H, q), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (q, H),
            "gate_proj": (H, Inter), "up_proj": (H, Inter), "down_proj": (Inter, H)}


def _nf4_bytes(n: int) -> float:
    """bitsandbytes NF4, double-quantised: packed nibbles, a uint8 scale per 64, fp32 per 256 scales."""
    return n / 2 + n / 64 + 4 * n / (64 * 256)


def weight_bytes(c: LlamaConfig, quantization: str | None = None, dtype_bytes: int = 2) -> int:
    """Frozen model bytes: embeddings, head and norms in 16-bit; the layers' linears per `quantization`."""
    H, L = c.hidden_size, c.num_hidden_layers
    linear = sum(i * o for i, o in _linear_shapes(c).values())
    bias = 0
    if c.attention_bias:
        bias += sum(o for n, (_, o) in _linear_shapes(c).items() if n in ("q_proj", "k_proj", "v_proj"))
    if c.attention_out_bias:
        bias += H
    norms = 2 * H + (2 * c.head_dim if c.qk_norm else 0)
    if quantization is None:
        per_layer = linear * dtype_bytes
    elif quantization == "4bit":
        per_layer = sum(_nf4_bytes(i * o) for i, o in _linear_shapes(c).values())
    elif quantization in ("8bit", "fp8"):  # a byte per element and an fp32 scale per row
        per_layer = sum(i * o + 4 * o for i, o in _linear_shapes(c).values())
    else:
        raise ValueError(f"quantization {quantization!r}: expected None, '4bit', '8bit' or 'fp8'")
    per_layer += (bias + norms) * dtype_bytes
    heads = c.vocab_size * H * (1 if c.tie_word_embeddings else 2)
    return int(L * per_layer + (heads + H) * dtype_bytes)


def adapter_params(c: LlamaConfig, r: int, targets: Sequence[str] = DEFAULT_TARGETS) -> int:
    shapes = _linear_shapes(c)
    unknown = [t for t in targets if t not in shapes]
    if unknown:
        raise ValueError(f"memory estimate: unknown LoRA targets {unknown}; known: {sorted(shapes)}")
    return c.num_hidden_layers * sum(r * (shapes[t][0] + shapes[t][1]) for t in targets)


def layer_saved_bytes(c: LlamaConfig, tokens: int, r: int = 16, act_bytes: int = 2,
                      use_kernels: bool = True) -> int:
    """Bytes one decoder layer keeps for its backward when it is not recomputed (see the module docstring)."""
    H, Inter, hd = c.hidden_size, c.intermediate_size, c.head_dim
    nh, nkv = c.num_attention_heads, c.num_key_value_heads
    elems = 4 * H + (2 * nh + 2 * nkv) * hd + 2 * Inter + 7 * r
    extra_fp32 = 4 * (2 + nh)
    if not use_kernels:  # silu(g) and silu(g) u, the rotated q/k halves, fp32 copies in the two norms
        elems += 2 * Inter + 2 * (nh + nkv) * hd
        extra_fp32 += 2 * 4 * 2 * H
    return tokens * (elems * act_bytes + extra_fp32)


@dataclass
class MemoryEstimate:
    weights: int
    adapters: int
    activations: int
    working: int

    @property
    def total(self) -> int:
        return self.weights + self.adapters + self.activations + self.working

    def describe(self) -> str:
        parts = ", ".join(f"{k} {getattr(self, k) / GiB:.2f}" for k in ("weights", "adapters", "activations",
                                                                        "working"))
        return f"estimated peak {self.total / GiB:.2f} GiB ({parts})"


def step_plan(c: LlamaConfig, settings: Checkpointing, *, batch: int, seq: int, act_bytes: int = 2,
              use_kernels: bool = True) -> MemoryPlan:
    """The plan of a step of `batch` rows of `seq` tokens (plain causal rows), as the model makes it."""
    return plan_memory(ModelShape.of(c), settings, tokens=batch * seq, span=seq, act_bytes=act_bytes,
                       fused=use_kernels)


def estimate_memory(
    c: LlamaConfig,
    plan: MemoryPlan,
    *,
    quantization: str | None = None,
    r: int = 16,
    targets: Sequence[str] = DEFAULT_TARGETS,
    optimizer: str = "adamw_8bit",
    use_kernels: bool = True,
    loss_chunk_elems: int = 1 << 27,
) -> MemoryEstimate:
    """Peak bytes of one training step (forward + backward + optimiser step) under `plan` (its tokens and
    bytes per activation element; `step_plan` makes it), with `use_kernels` (the saved tensors of the fused
    path, or of the references).

    Offloading plans: in the backward the layer at hand and the one being copied back hold their offloaded
    tensors on the GPU (x, and in halves x_mid, the kept attention output and q, k, v); a plan keeping gate/up
    on the host adds one layer's g and u (copied back one layer ahead of its backward); gate/up held on the
    device count per layer, except, with no kept layers, the last one's, held only beside the loss (its
    backward comes first and reuses them).
    """
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"memory estimate: optimizer {optimizer!r}: expected {sorted(OPTIMIZER_BYTES)}")
    N, H, L, act_bytes = plan.tokens, c.hidden_size, c.num_hidden_layers, plan.act_bytes
    weights = weight_bytes(c, quantization, act_bytes)
    if quantization in ("4bit", "fp8"):  # one shared buffer of the largest linear: NF4's dequantisation, or
        # FP8's transposed copy for the input gradients (a byte per element; FP8 dequantises to 16 bits only
        # where the tensor cores do not take the shapes)
        buffer_bytes = 1 if quantization == "fp8" else act_bytes
        weights += max(i * o for i, o in _linear_shapes(c).values()) * buffer_bytes
    n_adapter = adapter_params(c, r, targets)
    adapters = int(n_adapter * (4 + 4 + OPTIMIZER_BYTES[optimizer]))

    saved = layer_saved_bytes(c, N, r, act_bytes, use_kernels)
    x_bytes = N * H * act_bytes
    recomputed = plan.recomputed
    kept = L - recomputed
    offloaded, halves = plan.offloads, plan.halves
    if not offloaded:
        inputs = recomputed * x_bytes
    elif halves:
        inputs = int(2 * (3 + plan.qkv_share if plan.keep_attention != "off" else 2) * x_bytes)
    else:
        inputs = max(2, recomputed - plan.host_inputs) * x_bytes
    rope = N * c.head_dim * 2 * act_bytes  # cos and sin, shared by every layer
    loss_grad = x_bytes + 2 * x_bytes  # d loss / d hidden, the final norm's input and output
    activations = inputs + kept * saved + rope + loss_grad

    vocab_chunk = min(N, max(1, loss_chunk_elems // c.vocab_size)) * c.vocab_size * act_bytes
    layer_backward = saved + N * (c.intermediate_size + 4 * H) * act_bytes
    if offloaded and halves:  # recompute in halves: the MLP half is the larger one
        # x_mid and its norm, gate and up, the h / dh buffer, three (N, H) gradients, the rank-r products
        layer_backward = N * (5 * H + 3 * c.intermediate_size + 3 * r) * act_bytes
        if quantization == "4bit":  # the rerun's dequantised gate and up weights, held for its backward
            layer_backward += 2 * H * c.intermediate_size * act_bytes
        gate_up_bytes = 2 * N * c.intermediate_size * act_bytes
        if plan.count(gate_up="host"):
            activations += gate_up_bytes  # the next layer's, copied back during this one's backward
        d = plan.count(gate_up="device")
        if d and kept == 0:  # the last layer's only beside the loss: its backward reuses them
            vocab_chunk += gate_up_bytes
            d -= 1
        activations += d * gate_up_bytes
    if recomputed == 0:  # no recompute: the backward's extra is the MLP buffer and a few gradients
        layer_backward -= saved
    working = max(vocab_chunk, layer_backward)
    return MemoryEstimate(weights, adapters, activations, working)


def plan_keep_layers(c: LlamaConfig, settings: Checkpointing, *, batch: int, seq: int, budget_bytes: int,
                     act_bytes: int = 2, use_kernels: bool = True, **kwargs) -> int:
    """How many trailing layers may keep their activations ('selective', with the other `settings`) with the
    estimate under budget. 0 means every layer recomputes (and the budget may still be exceeded: check
    `estimate_memory`). `kwargs`: the rest of `estimate_memory`'s."""
    none_kept = dataclasses.replace(settings, mode="selective", keep_layers=0, narrow_keep=())
    plan = step_plan(c, none_kept, batch=batch, seq=seq, act_bytes=act_bytes, use_kernels=use_kernels)
    base = estimate_memory(c, plan, use_kernels=use_kernels, **kwargs).total
    per_layer = layer_saved_bytes(c, batch * seq, kwargs.get("r", 16), act_bytes, use_kernels)
    if budget_bytes <= base:
        return 0
    return min(c.num_hidden_layers, int((budget_bytes - base) // per_layer))


def narrow_keep_table(c: LlamaConfig, settings: Checkpointing, *, batch: int, seq: int, act_bytes: int = 2,
                      use_kernels: bool = True, **kwargs) -> tuple[int, ...]:
    """`Checkpointing.narrow_keep` for an offloading run of micro-batches up to `batch` x `seq` tokens: entry
    k-1 is the most tokens at which a micro-batch's last k layers keep their activations (no recompute, no
    host copies) with its activations and working memory (`estimate_memory`) within those of a full
    micro-batch under `settings`. Its peak is then at most the full micro-batch's, whose plan the run's
    printed estimate counts. The table ends at the first k that no width allows. `kwargs`: the rest of
    `estimate_memory`'s."""
    if not settings.offloads:
        return ()
    full = dataclasses.replace(settings, narrow_keep=())
    shape, n = ModelShape.of(c), c.num_hidden_layers

    def act_work(tokens: int, keep: int) -> int:
        s = dataclasses.replace(full, mode="selective", keep_layers=keep) if keep else full
        plan = plan_memory(shape, s, tokens=tokens, span=min(seq, tokens), act_bytes=act_bytes,
                           fused=use_kernels)
        e = estimate_memory(c, plan, use_kernels=use_kernels, **kwargs)
        return e.activations + e.working

    tokens = batch * seq
    budget = act_work(tokens, full.keep_layers)
    table = [tokens] * min(full.keep_layers, n)
    for k in range(len(table) + 1, n + 1):
        lo, hi = 0, table[-1] if table else tokens  # the most tokens within budget lies in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if act_work(mid, k) <= budget else (lo, mid - 1)
        if lo == 0:
            break
        table.append(lo)
    return tuple(table)
