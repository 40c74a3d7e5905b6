"""What changes the fused ops of one branch of a layer recomputed in halves (`LayerRecompute`).

A recomputed layer runs each branch twice: once in its forward, under no_grad, and once more for its
backward. Both runs call the same fused ops (`kernels.lora.lora_linear` for o, `lora_mlp`, `lora_qkv`,
`kernels.rms_norm.rms_norm`, `models.attention.attend`) with one `LayerPass`, passed down the branch:

    forward  `residual`: the branch's last product (o, down) returns residual + output, the residual
             written first and the base product accumulating onto it in its epilogue;
             what the forward keeps for the rerun goes into `kept`: h A_d^T of the down adapter always,
             gate/up outputs with `keep_gate_up`, the attention output and log-sum-exp with
             `keep_attention` ('auto': where the kernel allows; 'reference': also off CUDA, in fp32 math, for
             tests), and with `keep_qkv` also q, k, v (where the attention can rerun from them)
    rerun    `rerun`: lora_linear and lora_mlp return placeholders (their backward reads only what they
             save), and take from `kept` what the forward kept instead of recomputing it;
             `grad_addend`: the branch's input norm adds it to its input's gradient

Without a LayerPass (None) every op runs as a plain forward.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fasttune.memory.kept_attention import KeptAttention


@dataclass
class LayerKept:
    """What a recomputed layer's forward keeps for its rerun: filled by the fused ops in the forward, handed
    back (after the offloader's round trip) to the rerun's."""

    gate_up: tuple[torch.Tensor, torch.Tensor] | None = None  # g0, u0 (N, inter) of `lora_mlp`
    down_a: torch.Tensor | None = None  # h A_d^T (N, r) of `lora_mlp`
    attention: KeptAttention | None = None


@dataclass(frozen=True)
class LayerPass:
    """One branch's run in a recomputed layer (module docstring)."""

    rerun: bool = False
    residual: torch.Tensor | None = None
    grad_addend: torch.Tensor | None = None
    keep_gate_up: bool = False
    keep_attention: str = "off"
    keep_qkv: bool = False
    kept: LayerKept = field(default_factory=LayerKept)
