"""`LoRALinear`: a frozen linear layer (dense, or bitsandbytes 4/8-bit) plus a trainable low-rank update.

    y = base(x) + (dropout(x) @ A^T @ B^T) * scaling        A: (r, in), B: (out, r), scaling = alpha / r

Parameter names (`base_layer`, `lora_A`, `lora_B`) match PEFT's, so a state dict maps to PEFT's adapter
file by prefixing `base_model.model.`. Invariants (tested): B = 0 gives the base output; merged and
unmerged outputs agree; merging twice is a no-op; unmerge restores the base weight.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import warnings
import weakref
from collections.abc import Callable

import torch
import torch.nn as nn

# Class names of bitsandbytes layers, checked by name so that bitsandbytes is never imported here.
QUANTIZED_4BIT = ("Linear4bit", "LinearNF4", "LinearFP4")
QUANTIZED_8BIT = ("Linear8bitLt",)
QUANTIZED_FP8 = ("FP8Linear",)  # fasttune.models.fp8

# layer -> (what its dequantiser was made from, the dequantiser): outside the module, which stays picklable
_NF4_DEQUANTISERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

_kernel_fn: Callable | None = None
_kernel_looked_up = False


def _fused_lora_linear() -> Callable | None:
    """`fasttune.kernels.lora.lora_linear` if that module exists, else None (looked up once, lazily)."""
    global _kernel_fn, _kernel_looked_up
    if not _kernel_looked_up:
        _kernel_looked_up = True
        if importlib.util.find_spec("fasttune.kernels.lora") is not None:
            _kernel_fn = getattr(importlib.import_module("fasttune.kernels.lora"), "lora_linear", None)
    return _kernel_fn


def _nf4_dequantiser(packed: torch.Tensor, state) -> Callable[[], torch.Tensor]:
    """The dequantiser `kernels.lora` takes for an NF4 base: into the shared buffer, and `.fresh` into an own
    tensor, for a weight held past the next dequantisation."""
    from fasttune.kernels.nf4 import NF4Weight, dequantize_nf4

    nf4 = NF4Weight.from_bnb(packed, state)

    def dequant() -> torch.Tensor:
        return dequantize_nf4(nf4, reuse_buffer=True)

    dequant.fresh = lambda: dequantize_nf4(nf4)
    return dequant


_QUANTIZED = frozenset(QUANTIZED_4BIT + QUANTIZED_8BIT + QUANTIZED_FP8)


def is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ in _QUANTIZED


class LoRALinear(nn.Module):
    """Wraps `base` (frozen) and adds `lora_B(lora_A(dropout(x))) * scaling`.

    The adapter path runs in the adapter's dtype (`adapter_dtype`, fp32 by default as in PEFT) and the
    sum is cast back to the base output's dtype. `generator` seeds the kaiming-uniform init of A.
    """

    def __init__(
        self,
        base: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        *,
        adapter_dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if not isinstance(base, nn.Linear):  # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear
            raise TypeError(f"LoRALinear wraps an nn.Linear, not {type(base).__name__}")
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.lora_alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False
        self.disabled = False  # set by lora.reference.adapters_off: the forward runs the base alone
        self.use_kernels = False  # set by the model's `set_use_kernels`; needs fasttune.kernels.lora

        device = base.weight.device
        if adapter_dtype is None:
            adapter_dtype = torch.float32
        # Initialise on the CPU so that one seeded CPU generator gives the same A on every device.
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device="cpu", dtype=torch.float32)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device="cpu", dtype=torch.float32)
        with torch.no_grad():
            # PEFT's default: kaiming-uniform A, zero B, so training starts exactly at the base model. With a
            # generator, it draws what PEFT draws from the global one: A's and B's nn.Linear inits, then A's
            # own init, the one kept. A generator seeded as the global RNG was (Unsloth's get_peft_model
            # seeds it with random_state), in the same module order, then gives PEFT's very A matrices.
            if generator is not None:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
                nn.init.kaiming_uniform_(self.lora_B.weight, a=math.sqrt(5), generator=generator)
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5), generator=generator)
            nn.init.zeros_(self.lora_B.weight)
        self.lora_A.to(device=device, dtype=adapter_dtype)
        self.lora_B.to(device=device, dtype=adapter_dtype)

    # The base's tensors, for code that treats this module as the linear layer it replaces.
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base_layer.bias

    @property
    def quantized(self) -> bool:
        return is_quantized(self.base_layer)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, merged={self.merged}"

    def kernel_weight(self) -> torch.Tensor | Callable[[], torch.Tensor] | None:
        """The base weight for `fasttune.kernels.lora`: the dense tensor, a dequantiser for an NF4 or FP8 base
        (into a reused buffer; FP8's carries the FP8 weight as `.fp8` for the FP8 products), or None
        where the kernels cannot read the base (8-bit, FP4)."""
        base = self._modules["base_layer"]  # not nn.Module's lookup: this runs per projection and pass
        w = base.weight
        kind = type(base).__name__
        if kind not in _QUANTIZED:
            return w
        if kind in QUANTIZED_FP8:
            return base.dequantizer()
        # FSDP2 hands the layer its gathered weight as a plain tensor: the quantisation state is then the
        # one bitsandbytes also keeps on the module
        own = getattr(w, "quant_state", None)
        state = own or getattr(base, "quant_state", None)
        if kind in QUANTIZED_4BIT and getattr(state, "quant_type", None) == "nf4":
            if own is None:  # a gathered FSDP2 weight: other tensors at each call, nothing is kept
                _NF4_DEQUANTISERS.pop(self, None)
                return _nf4_dequantiser(w.data, state)
            # bitsandbytes' own parameter is the same tensors at every call: its dequantiser is made once, and
            # again where they changed (`_apply` drops it at once: it holds the tensors it reads)
            key = (w.data_ptr(), id(state), state.absmax.data_ptr())
            cached = _NF4_DEQUANTISERS.get(self)
            if cached is None or cached[0] != key:
                cached = _NF4_DEQUANTISERS[self] = (key, _nf4_dequantiser(w.data, state))
            return cached[1]
        return None

    def _apply(self, fn, recurse=True):
        _NF4_DEQUANTISERS.pop(self, None)  # `.to()` and the like replace the tensors its dequantiser holds
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or self.disabled:
            return self.base_layer(x)
        dropping = self.training and isinstance(self.lora_dropout, nn.Dropout)
        if self.use_kernels:
            fn, weight = _fused_lora_linear(), self.kernel_weight()
            if fn is not None and weight is not None:
                extra = {"x_lora": self.lora_dropout(x)} if dropping else {}
                return fn(x, weight, self.base_layer.bias, self.lora_A.weight, self.lora_B.weight,
                          self.scaling, **extra)
        result = self.base_layer(x)
        x = x.to(self.lora_A.weight.dtype)
        lora = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        # Add in the wider of the two dtypes, then round once to the base output dtype (as PEFT does).
        return (result + lora).to(result.dtype)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, shape (out, in): what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling

    def _check_mergeable(self) -> None:
        if self.quantized:
            raise RuntimeError(
                f"cannot merge LoRA into a quantised base layer ({type(self.base_layer).__name__}) in place; "
                "export/merge dequantises the base to 16-bit first and merges there")

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; the forward then runs the base alone."""
        self._check_mergeable()
        if self.merged:
            warnings.warn("LoRALinear.merge: already merged, nothing to do", stacklevel=2)
            return
        w = self.base_layer.weight
        w.copy_((w.float() + self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter from the base weight again (exact in fp32; rounding in 16-bit)."""
        if not self.merged:
            warnings.warn("LoRALinear.unmerge: not merged, nothing to do", stacklevel=2)
            return
        w = self.base_layer.weight
        w.copy_((w.float() - self.delta_weight().to(w.device)).to(w.dtype))
        self.merged = False
