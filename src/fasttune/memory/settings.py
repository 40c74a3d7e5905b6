"""The user's activation-memory settings for our Llama model: one frozen value, validated once."""

from __future__ import annotations

from dataclasses import dataclass

CHECKPOINT_MODES = ("off", "on", "offload", "selective")
OFFLOAD_MODES = ("offload", "selective")
KEEP_ATTENTION = ("auto", "reference", "off")


def parse_host_gate_up(value: str | float) -> float | str | None:
    """host_gate_up as a setting takes it: 'auto' or a share in [0, 1]; None when it is neither."""
    if isinstance(value, str):
        if value.strip().lower() == "auto":
            return "auto"
        try:
            value = float(value)
        except ValueError:
            return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if 0.0 <= value <= 1.0 else None


@dataclass(frozen=True)
class Checkpointing:
    """gradient_checkpointing and its options (`memory.plan` turns them into a plan per batch shape).

    mode            'off', 'on' (recompute each layer in the backward), 'offload' (also keep the recomputed
                    layers' saved tensors in pinned host memory), 'selective' (the last `keep_layers` layers
                    keep their activations, the others as 'offload')
    keep_layers     'selective' only (0 elsewhere)
    host_gate_up    offloading modes: the share of recomputed layers whose MLP gate/up outputs also go to the
                    host instead of being recomputed, or 'auto' (what the host link carries beside the other
                    copies); 0 in the other modes
    keep_attention  offloading modes: recomputed layers keep their attention output instead of rerunning
                    attention ('auto': where the CUDA kernel allows; 'reference': also elsewhere, in fp32
                    math, for tests; 'off')
    keep_qkv        with kept attention, also keep q, k, v so that the rerun skips their products
    device_gate_up  offloading modes: how many of the last recomputed layers hold gate/up on the device
    narrow_keep     offloading modes: entry k-1 is the most tokens at which a micro-batch's last k layers
                    keep their activations (no recompute) within the activation memory of a full one
                    (`memory.estimate.narrow_keep_table`); () keeps none beyond `keep_layers`
    """

    mode: str = "off"
    keep_layers: int = 0
    host_gate_up: float | str = "auto"
    keep_attention: str = "auto"
    keep_qkv: bool = True
    device_gate_up: int = 1
    narrow_keep: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in CHECKPOINT_MODES:
            raise ValueError(f"gradient_checkpointing={self.mode!r}: expected one of {CHECKPOINT_MODES}")
        if self.keep_layers < 0:
            raise ValueError(f"keep_layers={self.keep_layers}: must be >= 0")
        share = parse_host_gate_up(self.host_gate_up)
        if share is None:
            raise ValueError(f"host_gate_up={self.host_gate_up!r}: 'auto' or a share of the layers, "
                             "in [0, 1]")
        if self.device_gate_up < 0:
            raise ValueError(f"device_gate_up={self.device_gate_up}: a number of layers, >= 0")
        if self.keep_attention not in KEEP_ATTENTION:
            raise ValueError(f"keep_attention={self.keep_attention!r}: expected one of {KEEP_ATTENTION}")
        table = tuple(int(t) for t in self.narrow_keep)
        if any(t < 0 for t in table) or any(a < b for a, b in zip(table, table[1:])):
            raise ValueError(f"narrow_keep={table}: token counts >= 0, non-increasing with the kept layers")
        object.__setattr__(self, "narrow_keep", table if self.mode in OFFLOAD_MODES else ())
        object.__setattr__(self, "keep_layers", self.keep_layers if self.mode == "selective" else 0)
        object.__setattr__(self, "host_gate_up", share if self.mode in OFFLOAD_MODES else 0.0)

    @property
    def offloads(self) -> bool:
        return self.mode in OFFLOAD_MODES

    def kept_layers(self, tokens: int) -> int:
        """The trailing layers a micro-batch of `tokens` tokens keeps: `keep_layers`, or more where
        `narrow_keep` allows it at this width."""
        narrow = sum(1 for most in self.narrow_keep if tokens <= most)
        return max(self.keep_layers, narrow)
