"""Rotary position embedding tables of our Llama family: inverse frequencies per `rope_type` (default, linear,
dynamic NTK, llama3), and the cos/sin tables of a batch of positions. Applying them is `kernels/rope.py`.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def rope_inv_freq(
    head_dim: int,
    theta: float,
    rope_scaling: dict | None,
    max_position_embeddings: int,
    seq_len: int | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """Inverse frequencies (head_dim // 2,) in fp32, computed exactly as transformers does per rope_type."""
    kind = rope_scaling["rope_type"] if rope_scaling else "default"
    if kind == "dynamic" and seq_len is not None and seq_len > max_position_embeddings:
        # NTK-aware: stretch the base once the sequence outgrows the trained context.
        factor = rope_scaling["factor"]
        stretch = (factor * seq_len / max_position_embeddings) - (factor - 1)
        theta = theta * stretch ** (head_dim / (head_dim - 2))
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta ** exponents)  # (hd/2,)
    if kind == "linear":
        inv_freq = inv_freq / rope_scaling["factor"]
    elif kind == "llama3":
        factor = rope_scaling["factor"]
        low, high = rope_scaling["low_freq_factor"], rope_scaling["high_freq_factor"]
        old_len = rope_scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
        inv_freq = torch.where(medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(nn.Module):
    """cos/sin tables (B, T, head_dim) computed in fp32, cast to the activations' dtype."""

    def __init__(
        self, head_dim: int, theta: float, rope_scaling: dict | None, max_position_embeddings: int
    ) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self.rope_scaling, self.max_position_embeddings = rope_scaling, max_position_embeddings
        self.register_buffer("inv_freq", self._compute(), persistent=False)

    def _compute(self, seq_len: int | None = None, device: torch.device | None = None) -> torch.Tensor:
        return rope_inv_freq(
            self.head_dim, self.theta, self.rope_scaling, self.max_position_embeddings, seq_len, device
        )

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self.inv_freq
        if inv_freq.dtype != torch.float32 or inv_freq.device != position_ids.device:
            # Built on the meta device or cast with model.to(bf16): fp32 frequencies matter, recompute them.
            inv_freq = self.inv_freq = self._compute(device=position_ids.device)
        if self.rope_scaling is not None and self.rope_scaling["rope_type"] == "dynamic":
            seq_len = int(position_ids.max()) + 1
            if seq_len > self.max_position_embeddings:
                inv_freq = self._compute(seq_len, position_ids.device)
        freqs = position_ids[..., None].float() * inv_freq  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)
