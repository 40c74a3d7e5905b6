"""The host rule: how much pinned host memory offloaded activations may take, as the pinned allocator counts
it, and what the host link carries beside the compute.

Pinned copies of offloaded activations may take HOST_SHARE of host memory. torch's pinned allocator rounds
each allocation up to a power of two, so the offloader pins a tensor in power-of-two pieces (`pinned_pieces`)
and the rule counts them as the allocator does (`pinned_bytes`).
"""

from __future__ import annotations

import os

import psutil

HOST_SHARE = 0.4  # of host memory, for the pinned copies of offloaded activations
# Forward FLOPs under which one byte of host copies hides: ~680 TFLOP/s of bf16 products over the ~57 GB/s the
# copies run at on an H100 (benchmarks/RESULTS.md). Cards with less compute per byte of link hide more.
LINK_FLOP_PER_BYTE = 12_000
PIN_PIECE_MIN = 1 << 20  # bytes: the smallest power-of-two piece a pinned copy is split into


def host_bytes() -> int:
    """This process's share of the host's physical memory (psutil, on every platform): all of it, or under
    torchrun 1 / LOCAL_WORLD_SIZE of it, since the ranks of one host pin their offloaded activations in the
    same memory."""
    return psutil.virtual_memory().total // ranks_on_host()


def ranks_on_host() -> int:
    """How many training processes share this host: torchrun's LOCAL_WORLD_SIZE, else 1."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))) if "RANK" in os.environ else 1


def pinned_pieces(n: int) -> list[int]:
    """The byte sizes of the pieces an n-byte tensor is pinned in: powers of two, largest first, down to
    PIN_PIECE_MIN, then the rest in one. Whole, a 2.5 GiB layer input (Llama-3.1-8B at 1 x 327,680) would take
    4 GiB; in pieces of 2 GiB and 0.5 GiB it takes 2.5."""
    pieces = []
    while n >= PIN_PIECE_MIN:
        pieces.append(1 << (n.bit_length() - 1))
        n -= pieces[-1]
    return pieces + [n] if n else pieces


def pinned_bytes(n: int) -> int:
    """The pinned host memory an n-byte tensor takes in its `pinned_pieces`, as the allocator rounds them."""
    return sum(1 << (p - 1).bit_length() for p in pinned_pieces(n))


def host_fits(layers: int, layer_input_bytes: int, gate_up_layers: int, gate_up_bytes: int,
              kept_attention: bool = False, kept_qkv: float = 0.0) -> bool:
    """Whether recompute in halves stays within the rule: x and x_mid of each of `layers` layers (with
    `kept_attention` also its attention output, the size of its input, and its q, k, v, `kept_qkv` times
    that size), and the gate/up (g and u, together `gate_up_bytes`) of `gate_up_layers` of them."""
    per_layer = (3 + kept_qkv if kept_attention else 2) * pinned_bytes(layer_input_bytes)
    gate_up = 2 * pinned_bytes(gate_up_bytes // 2)
    return layers * per_layer + gate_up_layers * gate_up < HOST_SHARE * host_bytes()


def halves_fit_host(layers: int, layer_input_bytes: int, kept_attention: bool = False,
                    kept_qkv: float = 0.0) -> bool:
    """Recompute in halves, nothing else on the host (`host_fits`)."""
    return host_fits(layers, layer_input_bytes, 0, 0, kept_attention, kept_qkv)


def host_input_layers(layers: int, layer_input_bytes: int) -> int:
    """How many of `layers` whole-layer recomputes may keep their input on the host within the rule; the
    trailing rest keep it on the device. On Llama-3.1-8B at 1 x 262,144 tokens a layer's input is 2 GiB: 25
    of 32 layers on a 128 GiB host, where all 32 would pin half of it."""
    per = pinned_bytes(layer_input_bytes)
    room = int(HOST_SHARE * host_bytes())
    return layers if per == 0 else min(layers, max(0, (room - 1) // per))


def host_gate_up_count(layers: int, share: float, layer_input_bytes: int, gate_up_bytes: int,
                       kept_attention: bool = False, kept_qkv: float = 0.0) -> int:
    """How many of `layers` recomputed layers keep gate/up on the host: round(share x layers) in [0, layers],
    or as many as the rule (`host_fits`) leaves room for beside the layers' other pinned tensors."""
    k = min(layers, max(0, round(share * layers)))
    while k and not host_fits(layers, layer_input_bytes, k, gate_up_bytes, kept_attention, kept_qkv):
        k -= 1
    return k


def link_gate_up_share(tokens: int, span: int, attn_width: int, layer_params: int, layer_input_bytes: int,
                       gate_up_bytes: int, copied_per_input: float) -> float:
    """host_gate_up 'auto': the share of recomputed layers whose gate/up the host link carries in the forward.

    A layer's forward does 2 x tokens x `layer_params` FLOPs in its linears and 2 x tokens x `span` x
    `attn_width` in causal attention over rows of `span` tokens (0 where the rows are unknown, e.g. packed),
    which hide `LINK_FLOP_PER_BYTE` bytes of copies each; its inputs (`copied_per_input` x
    `layer_input_bytes`) go first, and half of the room left goes to gate/up: the copies come in bursts, so
    the link is not filled."""
    flops = 2 * tokens * layer_params + 2 * tokens * span * attn_width
    room = flops / LINK_FLOP_PER_BYTE - copied_per_input * layer_input_bytes
    return min(1.0, max(0.0, 0.5 * room / gate_up_bytes)) if gate_up_bytes > 0 else 0.0


def spread(n: int, k: int) -> set[int]:
    """k indices of range(n) spaced evenly (the host copies of their gate/up interleave with other layers)."""
    return {int((j + 0.5) * n / k) for j in range(k)} if k > 0 else set()
