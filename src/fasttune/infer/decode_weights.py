"""Packed base weights for the one-token decoding step: a layer's q/k/v projections become row slices of one
contiguous buffer, and gate/up of another, so the step runs one GEMV where it ran three (or two).

At batch 1 a decoding step streams every weight once and does little else; a few large GEMVs reach more of
the memory bandwidth than many small ones (and launch fewer kernels). No weight is copied twice: each
projection's `weight` Parameter keeps its identity (optimisers, hooks and the LoRA wrapper hold it) and
becomes a view of its rows in the buffer. Llama-3.1-8B (H 4096, 32 heads, 8 KV heads, hd 128, I 14336):
```
qkv buffer      (6144, 4096)    rows     0..4095  q_proj.weight
                                rows  4096..5119  k_proj.weight
                                rows  5120..6143  v_proj.weight
gate_up buffer  (28672, 4096)   rows     0..14335 gate_proj.weight
                                rows 14336..28671 up_proj.weight
```
A row slice of a contiguous 2-D tensor is itself contiguous, so training kernels, merging (in-place writes)
and state dicts see ordinary weights; only a safetensors writer that refuses tensors sharing storage needs
them `.clone()`d. A group whose weights cannot be packed (a 4/8-bit bitsandbytes base, biases present on some
projections only, mixed dtypes or devices) stays as it is and the step runs its projections one by one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fasttune.lora.layer import LoRALinear, is_quantized


def dense_base(proj: nn.Module) -> nn.Linear | None:
    """The plain linear layer under `proj` (itself, or a LoRA layer's base), or None for a quantised base."""
    base = proj.base_layer if isinstance(proj, LoRALinear) else proj
    if not isinstance(base, nn.Linear) or is_quantized(base):
        return None
    w = base.weight
    if not w.is_floating_point() or w.is_meta or w.dim() != 2:
        return None
    return base


def lora_term(proj: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """`proj`'s output given its base product `y` = x @ W^T (+ b): y plus the adapter's term when `proj` is an
    unmerged LoRA layer, with the rounding of `LoRALinear.forward` (sum in the wider dtype, one cast back)."""
    if not isinstance(proj, LoRALinear) or proj.merged:
        return y
    xa = proj.lora_dropout(x.to(proj.lora_A.weight.dtype))  # identity in eval mode
    return (y + proj.lora_B(proj.lora_A(xa)) * proj.scaling).to(y.dtype)


class PackedLinear(nn.Module):
    """Several projections' base products as one: x @ weight^T (+ bias), split into `sizes` along the last
    dimension. weight: (sum(sizes), in) sharing storage with the projections' own weights."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, sizes: tuple[int, ...]) -> None:
        super().__init__()
        # Parameters (not plain attributes): torch.compile's CUDA graphs then treat them as static inputs
        # and read them in place instead of copying 16 GB into the graph's input buffers every token.
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.sizes = sizes

    def forward(self, x: torch.Tensor, projs: tuple[nn.Module, ...]) -> list[torch.Tensor]:
        """x: (..., in) -> each projection's output (..., size_i), adapters included."""
        ys = F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)  # views of one (..., sum) product
        return [lora_term(p, x, y) for p, y in zip(projs, ys)]


class DecodeWeights:
    """Per decoder layer: the packed q/k/v and gate/up products, or None where a group was not packed."""

    def __init__(self, qkv: list[PackedLinear | None], gate_up: list[PackedLinear | None]) -> None:
        self.qkv, self.gate_up = qkv, gate_up

    @property
    def n_packed(self) -> int:
        return sum(p is not None for p in self.qkv + self.gate_up)


def joined_rows(ts: list[torch.Tensor]) -> torch.Tensor | None:
    """The (sum of rows, *rest) tensor over `ts` when they already lie back to back, in order, in one storage
    (the layout `pack_group` leaves); else None."""
    first = ts[0].detach()
    rest = first.shape[1:]
    offset = first.storage_offset()
    ptr = first.untyped_storage().data_ptr()
    for t in ts:
        if not t.is_contiguous() or t.shape[1:] != rest or t.dtype != first.dtype or t.device != first.device:
            return None
        if t.untyped_storage().data_ptr() != ptr or t.storage_offset() != offset:
            return None
        offset += t.numel()
    rows = sum(t.shape[0] for t in ts)
    return first.as_strided((rows, *rest), first.stride(), first.storage_offset())


@torch.no_grad()
def _repack(params: list[torch.Tensor]) -> torch.Tensor:
    """Copy `params` into one new buffer and make each a view of its rows (same Parameter objects)."""
    first = params[0]
    buf = torch.empty((sum(p.shape[0] for p in params), *first.shape[1:]), dtype=first.dtype,
                      device=first.device)
    start = 0
    for p in params:
        rows = buf[start:start + p.shape[0]]
        rows.copy_(p)
        # `.data =` keeps the Parameter (and its requires_grad, its owner's reference) and swaps the storage;
        # the old storage is freed once nothing else holds it.
        p.data = rows
        start += p.shape[0]
    return buf


def pack_group(projs: tuple[nn.Module, ...]) -> PackedLinear | None:
    """Pack the base weights (and biases) of `projs`, all reading the same input, into one PackedLinear;
    None when they cannot share one product."""
    bases = [dense_base(p) for p in projs]
    if any(b is None for b in bases):
        return None
    ws = [b.weight for b in bases]
    if len({(w.dtype, w.device, w.shape[1]) for w in ws}) != 1:
        return None
    biases = [b.bias for b in bases]
    has_bias = {b is not None for b in biases}
    if len(has_bias) != 1:
        return None  # a bias on some projections only: one addmm cannot add it
    if True in has_bias and len({(b.dtype, b.device) for b in biases} | {(ws[0].dtype, ws[0].device)}) != 1:
        return None
    weight = joined_rows(ws)
    if weight is None:
        weight = _repack(ws)
    bias = None
    if True in has_bias:
        bias = joined_rows(biases)
        if bias is None:
            bias = _repack(biases)
    return PackedLinear(weight, bias, tuple(w.shape[0] for w in ws))


def pack_decode_weights(model: nn.Module) -> DecodeWeights:
    """Pack every decoder layer of `model` (our LlamaForCausalLM), layer by layer; weights already packed
    are taken as they lie (no copy), so calling this again after e.g. attaching adapters is cheap.

    Each layer's new buffers are allocated before its old weights are freed, so the memory in use grows by
    one layer's q/k/v + gate/up at most. On CUDA the freed blocks would stay in the caching allocator (a
    new buffer is larger than any of them, so it cannot reuse them); emptying the cache after each layer
    keeps the reserved memory at that bound too (~0.3 GB for 8B, instead of ~13 GB).
    """
    qkv, gate_up = [], []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        ptrs = [p.data_ptr() for p in layer.parameters()]
        qkv.append(pack_group((a.q_proj, a.k_proj, a.v_proj)))
        gate_up.append(pack_group((m.gate_proj, m.up_proj)))
        moved = ptrs != [p.data_ptr() for p in layer.parameters()]
        if moved and torch.cuda.is_available() and any(p.is_cuda for p in layer.parameters()):
            torch.cuda.empty_cache()
    return DecodeWeights(qkv, gate_up)
