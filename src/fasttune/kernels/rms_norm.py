"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, statistics in fp32, output in x's dtype.

(Triton forward/backward to come; `rms_norm` dispatches to the reference until then.)
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same rounding points as transformers' LlamaRMSNorm: normalise in fp32, cast back, then scale.
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)
