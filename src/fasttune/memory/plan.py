"""The activation-memory plan of a training step: for each decoder layer, whether it is recomputed and how,
where its saved tensors live, and what it keeps for its rerun.

One `MemoryPlan` comes from the model's shape, the user's `Checkpointing`, the batch (tokens, row length,
bytes per activation), the kernel path (fused layers recompute in halves) and the host rule (`memory.host`).
It is built once per batch shape (cached) and read by everything that needs it: `memory.recompute.run_layers`
executes it, `memory.estimate.estimate_memory` counts it, and the run log prints `describe()`.

    mode        layer i             recompute   saved tensors               kept for the rerun
    off         every layer         none        all, on the device          -
    on          every layer         whole       input x on the device       -
    offload     every layer         halves      x, x_mid in pinned host     attention O + lse, q/k/v,
                (fused, host room)              memory (the last layer:     gate/up (host or device)
                                                on the device)
                otherwise           whole       x in pinned host memory     -
                                                (the last layer and those
                                                past the host rule's room:
                                                on the device)
    selective   the last keep_layers: none; the others as offload

Halves (`LayerRecompute`) rerun each half of a layer for its own backward and skip the o and down products;
whole layers go through torch's checkpoint, as does a planned half whose projections are not all fused
(`run_layers` asks each layer). The host rule turns off, in this order, kept q/k/v, kept
attention and recompute in halves where their pinned copies would pass it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from fasttune.memory import host
from fasttune.memory.settings import Checkpointing


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a Llama-family config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    qk_norm: bool

    @classmethod
    def of(cls, c) -> ModelShape:
        return cls(c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
                   c.num_key_value_heads, c.head_dim, c.qk_norm)

    @property
    def qkv_share(self) -> float:
        """A layer's q, k, v relative to its input x, where they can be kept (no q/k norms), else 0."""
        return 0.0 if self.qk_norm else (self.heads + 2 * self.kv_heads) * self.head_dim / self.hidden

    @property
    def layer_params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.hidden * (q + 2 * kv) + q * self.hidden + 3 * self.hidden * self.intermediate


@dataclass(frozen=True)
class LayerPlan:
    """One layer: `recompute` 'none' (keeps its activations), 'whole' (torch's checkpoint) or 'halves'
    (`LayerRecompute`); `input` where its saved tensors live, 'device' or 'host' (pinned); `gate_up` where a
    layer in halves keeps its MLP gate/up outputs: '' (recomputed), 'device' or 'host'."""

    recompute: str = "none"
    input: str = "device"
    gate_up: str = ""


@dataclass(frozen=True)
class MemoryPlan:
    """The plan of a step (module docstring). `keep_attention` and `keep_qkv` are what the layers in halves
    keep after the host rule (`qkv_share`: their q, k, v relative to x); `host_inputs` how many whole-layer
    recomputes the host rule has room for; `fused` whether the layers take the fused kernel path; `tokens`
    and `act_bytes` the batch it was made for."""

    mode: str
    layers: tuple[LayerPlan, ...]
    keep_attention: str
    keep_qkv: bool
    qkv_share: float
    host_inputs: int
    fused: bool
    tokens: int
    act_bytes: int

    @property
    def recomputed(self) -> int:
        return sum(1 for p in self.layers if p.recompute != "none")

    @property
    def offloads(self) -> bool:
        return self.mode in ("offload", "selective") and self.recomputed > 0

    @property
    def halves(self) -> bool:
        return any(p.recompute == "halves" for p in self.layers)

    def count(self, **fields) -> int:
        """How many layers have these field values, e.g. count(recompute='whole', input='host')."""
        return sum(1 for p in self.layers if all(getattr(p, k) == v for k, v in fields.items()))

    def placement(self) -> str:
        """Where an offloading plan keeps the recomputed layers' inputs."""
        if self.halves:
            return "recompute in halves, layer inputs in pinned host memory"
        r, on_host = self.recomputed, self.host_inputs
        why = ", as recompute in halves would pass 40% of host memory" if self.fused else ""
        if on_host >= r:
            return f"whole-layer recompute{why}; layer inputs in pinned host memory"
        return (f"whole-layer recompute{why}; the inputs of {on_host} of {r} layers in pinned host memory, "
                f"of the last {r - on_host} on the GPU: 40% of host memory holds no more")

    def describe(self) -> str:
        """The plan in one line, for the run log."""
        n, r = len(self.layers), self.recomputed
        if not self.offloads:
            return f"{self.mode}: " + ("every layer keeps its activations" if r == 0 else
                                       "every layer recomputed, its input on the GPU")
        head = f"{self.mode}: " + (f"the last {n - r} of {n} layers keep their activations; " * (r < n))
        if not self.halves:
            return head + self.placement()
        kept = ["attention output" + (", q, k, v" if self.keep_qkv else "")] if self.keep_attention != "off" \
            else []
        kept += [f"gate/up of {self.count(gate_up=w)} layers on the {'GPU' if w == 'device' else 'host'}"
                 for w in ("device", "host") if self.count(gate_up=w)]
        return head + self.placement() + (f"; kept: {'; '.join(kept)}" if kept else "")


def plan_memory(shape: ModelShape, settings: Checkpointing, *, tokens: int, span: int, act_bytes: int,
                fused: bool) -> MemoryPlan:
    """The plan for a step of `tokens` tokens in causal rows of `span` (0: packed or masked rows) with
    `act_bytes` per activation element; `fused`: the fused kernel path, whose layers recompute in halves.
    Cached per arguments and host size."""
    return _plan(shape, settings, tokens, span, act_bytes, fused, host.host_bytes())


def host_gate_up_share(shape: ModelShape, setting: float | str, tokens: int, span: int, kept_attention: bool,
                       kept_qkv: float = 0.0, act_bytes: int = 2) -> float:
    """`setting` ('auto' or a share in [0, 1]) as a share of recomputed layers keeping gate/up on the host.

    'auto': what the host link carries beside the copies each recomputed layer makes already (x, x_mid, the
    kept attention output and `kept_qkv` x q, k, v: `host.link_gate_up_share`), for `tokens` tokens in causal
    rows of `span`; only with kept attention: without it the attention's compute is rerun, nothing to hide
    copies under."""
    if setting != "auto":
        return float(setting)
    if not kept_attention:
        return 0.0
    H, inter = shape.hidden, shape.intermediate
    return host.link_gate_up_share(tokens, span, shape.heads * shape.head_dim, shape.layer_params,
                                   tokens * H * act_bytes, 2 * tokens * inter * act_bytes, 3 + kept_qkv)


@functools.lru_cache(maxsize=256)
def _plan(shape: ModelShape, s: Checkpointing, tokens: int, span: int, act_bytes: int,
          fused: bool, host_size: int) -> MemoryPlan:
    del host_size  # a key only: the host rule reads it through `host.host_bytes()`
    n = shape.layers
    R = 0 if s.mode == "off" else n - min(s.kept_layers(tokens), n)
    offload = s.offloads and R > 0
    x_bytes = tokens * shape.hidden * act_bytes
    gate_up_bytes = 2 * tokens * shape.intermediate * act_bytes
    keep_attention = s.keep_attention
    qkv = shape.qkv_share if s.keep_qkv and keep_attention != "off" else 0.0
    share = host_gate_up_share(shape, s.host_gate_up, tokens, span, keep_attention != "off", qkv,
                               act_bytes) if s.offloads else 0.0
    # the host rule, in this order: kept q/k/v, kept attention, recompute in halves
    if keep_attention == "off" or not host.halves_fit_host(R, x_bytes, True, qkv):
        qkv = 0.0
    if keep_attention != "off" and not host.halves_fit_host(R, x_bytes, kept_attention=True):
        keep_attention = "off"
    halves = host.halves_fit_host(R, x_bytes)
    on_host = host.host_input_layers(R, x_bytes)  # whole layers: the rest keep their input on the device
    k = host.host_gate_up_count(R, share, x_bytes, gate_up_bytes, keep_attention != "off", qkv) \
        if offload else 0
    on_device = max(0, min(s.device_gate_up, R)) if offload else 0
    gate_up = {i: "host" for i in host.spread(R, k)}
    gate_up.update({i: "device" for i in range(R - on_device, R)})
    layers = []
    for i in range(n):
        if i >= R:
            layers.append(LayerPlan())
        elif not offload:
            layers.append(LayerPlan("whole"))
        elif halves and fused:  # the last layer's tensors stay: its backward follows the loss at once
            layers.append(LayerPlan("halves", "device" if i == R - 1 else "host", gate_up.get(i, "")))
        else:
            layers.append(LayerPlan("whole", whole_layer_input(i, R, on_host)))
    return MemoryPlan(s.mode, tuple(layers), keep_attention, qkv > 0, qkv, on_host, fused, tokens, act_bytes)


def pinned_copy_bytes(plan: MemoryPlan, shape: ModelShape, align: int) -> int:
    """The host memory one step of `plan` copies its offloaded tensors into, each tensor in a slice of its
    own rounded up to `align` bytes (`memory.pinned`): per layer in halves whose tensors go to the host its
    input x and midpoint x_mid, with kept attention its output and log-sum-exp (fp32), with kept q/k/v those
    three, and gate/up where the plan keeps them there; per whole layer on the host its input."""
    def up(n: int) -> int:
        return -(-n // align) * align

    t, a = plan.tokens, plan.act_bytes
    x, heads = up(t * shape.hidden * a), shape.heads * shape.head_dim
    total = 0
    for lp in plan.layers:
        if lp.recompute == "none" or lp.input != "host":
            continue
        if lp.recompute == "whole":
            total += x
            continue
        total += 2 * x
        if plan.keep_attention != "off":
            total += up(t * heads * a) + up(t * shape.heads * 4)
            if plan.keep_qkv:
                total += up(t * heads * a) + 2 * up(t * shape.kv_heads * shape.head_dim * a)
        if lp.gate_up == "host":
            total += 2 * up(t * shape.intermediate * a)
    return total


def whole_layer_input(i: int, recomputed: int, host_inputs: int) -> str:
    """Where offloaded whole-layer recompute keeps layer i's input: on the device for the last recomputed
    layer (its backward follows the loss at once, with nothing to overlap a copy back) and for those past
    the `host_inputs` the host rule has room for; in pinned host memory otherwise."""
    return "device" if i == recomputed - 1 or i >= host_inputs else "host"
