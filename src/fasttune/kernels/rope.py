"""Rotary position embedding on q and k, rotate-half convention (as transformers' Llama).

q: (B, T, n_heads, head_dim), k: (B, T, n_kv_heads, head_dim), cos/sin: (B, T, head_dim).
out = x * cos + rotate_half(x) * sin, rotate_half([x1, x2]) = [-x2, x1].
(Triton kernel to come; `apply_rope` dispatches to the reference until then.)
"""

from __future__ import annotations

import torch


def apply_rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    return apply_rope_reference(q, k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos = cos.unsqueeze(2).to(q.dtype)  # (B, T, 1, hd)
    sin = sin.unsqueeze(2).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
