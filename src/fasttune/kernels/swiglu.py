"""SwiGLU activation of the Llama MLP: h = silu(gate) * up.

(Triton kernel to come; `swiglu` dispatches to the reference until then.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return swiglu_reference(gate, up)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up
