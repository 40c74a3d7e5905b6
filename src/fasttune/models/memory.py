"""Peak GPU memory of a LoRA/QLoRA training step of our Llama model, estimated before anything is allocated,
and the number of layers that may keep their activations ('selective' checkpointing) within a budget.

The estimate adds four parts (bytes; N = batch x seq tokens, e = bytes per activation element):
    weights      16-bit tensors, or NF4 (half a byte per element plus block scales) for 4-bit linears
    adapters     LoRA A and B in fp32, their gradients, and the optimiser state (8-bit AdamW: 2 bytes/param)
    activations  what stays on the GPU between the forward and the backward: each recomputed layer's input
                 x (N H e; when offloaded, two layers' only: x, and x_mid in halves), all saved tensors of
                 each kept layer, the loss gradient
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

from collections.abc import Sequence
from dataclasses import dataclass

from fasttune.models.activations import halves_fit_host, host_gate_up_count, host_input_layers
from fasttune.models.llama import LlamaConfig, host_gate_up_share

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


def estimate_memory(
    c: LlamaConfig,
    *,
    batch: int,
    seq: int,
    quantization: str | None = None,
    r: int = 16,
    targets: Sequence[str] = DEFAULT_TARGETS,
    checkpointing: str = "on",
    keep_layers: int = 0,
    optimizer: str = "adamw_8bit",
    act_bytes: int = 2,
    use_kernels: bool = True,
    loss_chunk_elems: int = 1 << 27,
    halves: bool | None = None,
    host_gate_up: float | str = "auto",
    kept_attention: bool = False,
    kept_qkv: float = 0.0,
    device_gate_up: int = 1,
) -> MemoryEstimate:
    """Peak bytes of one training step (forward + backward + optimiser step) at `batch` x `seq` tokens.

    halves: whether offloading modes recompute in halves (None: as `activations.run_layers` decides it,
    from the fused path and the host's memory). host_gate_up: the share of recomputed layers keeping their
    gate/up outputs on the host (their copy back, one layer ahead of its backward, adds one layer's g and u),
    or 'auto' (`llama.host_gate_up_share`, for unpacked rows of `seq` tokens).
    kept_attention: offloading modes also keep each recomputed layer's attention output (as large as x) on
    the host, so the two layers on the GPU in the backward hold three such tensors each, not two; with
    `kept_qkv` (q, k, v relative to x, `LlamaModel.kept_qkv_share`) they hold that much more each.
    device_gate_up: offloading modes hold the gate/up of that many last recomputed layers on the device;
    with no kept layers the last one's only beside the loss (its backward comes first and reuses them).
    """
    if optimizer not in OPTIMIZER_BYTES:
        raise ValueError(f"memory estimate: optimizer {optimizer!r}: expected {sorted(OPTIMIZER_BYTES)}")
    N, H, L = batch * seq, c.hidden_size, c.num_hidden_layers
    weights = weight_bytes(c, quantization, act_bytes)
    if quantization in ("4bit", "fp8"):  # one shared dequantisation buffer of the largest linear
        weights += max(i * o for i, o in _linear_shapes(c).values()) * act_bytes
    n_adapter = adapter_params(c, r, targets)
    adapters = int(n_adapter * (4 + 4 + OPTIMIZER_BYTES[optimizer]))

    saved = layer_saved_bytes(c, N, r, act_bytes, use_kernels)
    x_bytes = N * H * act_bytes
    if checkpointing == "off":
        kept, recomputed = L, 0
    elif checkpointing == "selective":
        kept = min(max(keep_layers, 0), L)
        recomputed = L - kept
    elif checkpointing in ("on", "offload"):
        kept, recomputed = 0, L
    else:
        raise ValueError(f"memory estimate: checkpointing {checkpointing!r}")
    offloaded = checkpointing in ("offload", "selective")
    if halves is None:
        halves = use_kernels and halves_fit_host(recomputed, x_bytes)
    # Offloaded: the layer in its backward and the one being copied back, each with its input x; recompute
    # in halves also with x_mid (and O, when kept). Whole layers: the trailing layers past the host's room
    # keep x on the device, all of them at the backward's start.
    if not (offloaded and recomputed):
        inputs = recomputed * x_bytes
    elif halves:
        inputs = int(2 * (3 + kept_qkv if kept_attention else 2) * x_bytes)
    else:
        inputs = max(2, recomputed - host_input_layers(recomputed, x_bytes)) * x_bytes
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
        share = host_gate_up_share(c, host_gate_up, N, seq, kept_attention, kept_qkv, act_bytes)
        if host_gate_up_count(recomputed, share, x_bytes, gate_up_bytes, kept_attention, kept_qkv):
            activations += gate_up_bytes  # the next layer's, copied back during this one's backward
        d = max(0, min(device_gate_up, recomputed))
        if d and kept == 0:  # the last layer's only beside the loss: its backward reuses them
            vocab_chunk += gate_up_bytes
            d -= 1
        activations += d * gate_up_bytes
    if recomputed == 0:  # no recompute: the backward's extra is the MLP buffer and a few gradients
        layer_backward -= saved
    working = max(vocab_chunk, layer_backward)
    return MemoryEstimate(weights, adapters, activations, working)


def plan_keep_layers(c: LlamaConfig, *, batch: int, seq: int, budget_bytes: int, **kwargs) -> int:
    """How many trailing layers may keep their activations ('selective') with the estimate under budget.

    0 means every layer recomputes (and the budget may still be exceeded: check `estimate_memory`).
    """
    base = estimate_memory(c, batch=batch, seq=seq, checkpointing="selective", keep_layers=0, **kwargs).total
    per_layer = layer_saved_bytes(c, batch * seq, kwargs.get("r", 16), kwargs.get("act_bytes", 2),
                                  kwargs.get("use_kernels", True))
    if budget_bytes <= base:
        return 0
    return min(c.num_hidden_layers, int((budget_bytes - base) // per_layer))


def offload_placement(c: LlamaConfig, tokens: int, act_bytes: int = 2, use_kernels: bool = True) -> str:
    """Where 'offload' keeps the layer inputs of micro-batches of `tokens` tokens, as `activations.run_layers`
    decides it from the host rule (40% of host memory for pinned tensors), for the run log."""
    L, x_bytes = c.num_hidden_layers, tokens * c.hidden_size * act_bytes
    if use_kernels and halves_fit_host(L, x_bytes):
        return "recompute in halves, layer inputs in pinned host memory"
    on_host = host_input_layers(L, x_bytes)
    why = ", as recompute in halves would pass 40% of host memory" if use_kernels else ""
    if on_host >= L:
        return f"whole-layer recompute{why}; layer inputs in pinned host memory"
    return (f"whole-layer recompute{why}; the inputs of {on_host} of {L} layers in pinned host memory, of the "
            f"last {L - on_host} on the GPU: 40% of host memory holds no more")


def auto_checkpointing(device_type: str) -> str:
    """What gradient_checkpointing 'auto' means for our Llama family.

    CPU: 'off' (time is the limit there, and RAM is usually ample for the models that train on a CPU).
    GPU: 'offload', layer inputs in pinned host memory: the fastest at the least GPU memory in
    benchmarks/RESULTS.md. It recomputes in halves while their pinned buffers stay within the host rule of
    `halves_fit_host`, else whole layers, with as many layers' inputs on the host as the rule has room for
    and the trailing rest on the GPU (`activations.host_input_layers`). ('on' kept every input on the GPU
    where recompute in halves did not fit the host: 32 GiB more than 'offload' on Llama-3.1-8B at 131,072
    tokens.)
    """
    return "offload" if device_type == "cuda" else "off"
