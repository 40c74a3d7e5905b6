"""FP8 frozen base: `load_in_fp8` stores each decoder linear's weight in e4m3 with one scale per output row
(half the bytes of bf16) and runs its products on FP8 tensor cores (`kernels/fp8.py`): the forward's x W^T
and the backward's input gradient dy W.

Only the frozen base changes: LoRA adapters, their products, norms, attention, the output head and the
embeddings stay in 16/32-bit. The forward (and its rerun under checkpointing) sees FP8-rounded inputs and
weights and the input gradients FP8-rounded output gradients, so the loss moves within FP8's precision;
benchmarks/RESULTS.md holds the loss curve against bf16.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn as nn

from fasttune.kernels.fp8 import (
    E4M3,
    FP8Weight,
    dequantize_fp8,
    fp8_grad_input,
    fp8_product,
    fp8_supported,
    quantize_weight_fp8,
)

SKIP = ("lm_head",)


class FP8LinearFunction(torch.autograd.Function):
    """y = x W^T (+ b) and dx = dy W with W in FP8 (`kernels/fp8.py`), no weight gradient."""

    @staticmethod
    def forward(ctx, x, data, scale, bias):
        w = FP8Weight(data, scale)
        dt = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).to(dt)
        y = fp8_product(x2, w, dt)
        if bias is not None:
            y = y + bias.to(dt)
        ctx.save_for_backward(data, scale)
        ctx.x_dtype = x.dtype
        return y.view(*x.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        data, scale = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])
        dx = fp8_grad_input(dy2, FP8Weight(data, scale), dy2.dtype).to(ctx.x_dtype)
        return dx.view(*dy.shape[:-1], dx.shape[-1]), None, None, None


class FP8Linear(nn.Linear):
    """A frozen nn.Linear whose weight is e4m3 (`weight`, (out, in)) with fp32 row scales (`weight_scale`)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False, device=None,
                 dtype: torch.dtype = torch.bfloat16) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=E4M3, device=device),
                                   requires_grad=False)
        self.register_buffer("weight_scale", torch.ones(out_features, 1, dtype=torch.float32, device=device))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)

    @classmethod
    @torch.no_grad()
    def from_linear(cls, lin: nn.Linear) -> FP8Linear:
        w = quantize_weight_fp8(lin.weight)
        q = cls(lin.in_features, lin.out_features, lin.bias is not None, device=lin.weight.device,
                dtype=lin.weight.dtype)
        q.weight.data, q.weight_scale.data = w.data, w.scale
        if lin.bias is not None:
            q.bias.data = lin.bias.data.clone()
        return q

    def fp8(self) -> FP8Weight:
        return FP8Weight(self.weight, self.weight_scale)

    def dequantizer(self):
        """For `kernels.lora`: a callable giving the bf16 weight (shared buffer), carrying `.fp8` (which the
        kernels' products use instead where FP8 tensor cores take the shapes)."""
        w = self.fp8()

        def dequant() -> torch.Tensor:
            return dequantize_fp8(w, torch.bfloat16, reuse_buffer=True)

        dequant.fp8 = w
        return dequant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return FP8LinearFunction.apply(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8=e4m3"


@torch.no_grad()
def fp8_linears(model: nn.Module, device: torch.device | str, skip: Iterable[str] = SKIP,
                require_fp8_cores: bool = True) -> list[str]:
    """Replace each plain nn.Linear (but `skip`) by an FP8Linear on `device`, one layer at a time (the
    16-bit model never sits on the device whole); returns the replaced module names.
    `require_fp8_cores=False` allows any device (products then run against the dequantised weight: tests)."""
    device = torch.device(device)
    if require_fp8_cores and not fp8_supported(device):
        raise RuntimeError(f"load_in_fp8 needs a GPU with FP8 tensor cores (compute capability 8.9+: L4, "
                           f"L40, H100, ...); {device} has none")
    skip = tuple(skip)
    names = [n for n, m in model.named_modules() if type(m) is nn.Linear and n.rsplit(".", 1)[-1] not in skip]
    for name in names:
        parent, _, child = name.rpartition(".")
        lin = model.get_submodule(name)
        setattr(model.get_submodule(parent), child, FP8Linear.from_linear(lin.to(device)))
        lin.to("meta")  # free the 16-bit copy now
    return names
