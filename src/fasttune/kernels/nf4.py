"""NF4 dequantisation of bitsandbytes' blockwise 4-bit weights, into a reused output buffer.

Layout (bitsandbytes `quantize_4bit(..., quant_type="nf4")`), for a weight of n = prod(shape) elements:
    packed   uint8 (ceil(n/2),)   element 2i in the high nibble of byte i, element 2i+1 in the low nibble
    absmax   fp32 (ceil(n/bs),)   one scale per block of bs = 64 elements (the block's largest |w|)
             or, double-quantised ("nested"), uint8 codes into a 256-entry table `nested_code`, with one fp32
             scale `nested_absmax` per 256 blocks and an fp32 `offset`:
                 absmax[j] = nested_code[absmax_u8[j]] * nested_absmax[j // 256] + offset
    code     fp32 (16,)           the NF4 values (quantiles of a normal distribution, -1 ... 1)
Dequantised, in fp32 then rounded once to the compute dtype (as bitsandbytes does):
    w[e] = code[nibble(e)] * absmax[e // bs]
Worked example, bs = 64: byte 0 = 0x7F holds elements 0 (code[7] = 0.0) and 1 (code[15] = 1.0), both scaled
by absmax[0]. There is no backward: the base weight is frozen; LoRA gradients flow through the dequantised
copy (see `kernels/lora.py`, which calls the dequantiser in its forward and again in its backward).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from fasttune.kernels._dispatch import cdiv, jit, tl, to_dtype, use_triton
from fasttune.kernels.scratch import Scratch

# bitsandbytes' NF4 table (functional.py, get_4bit_type("nf4")).
NF4_CODE = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524352073669,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)

_BLOCK_BYTES = 1024  # packed bytes per program (whole quantisation blocks)


@dataclass
class NF4Weight:
    """A 4-bit weight: the packed bytes and everything needed to dequantise them."""

    packed: torch.Tensor  # uint8, ceil(n/2) elements (any shape; bitsandbytes stores (n/2, 1))
    absmax: torch.Tensor  # fp32 (n_blocks,), or uint8 (n_blocks,) when nested
    shape: tuple[int, ...]
    dtype: torch.dtype  # the dtype to dequantise into
    blocksize: int = 64
    code: torch.Tensor | None = None  # 16 fp32 values; NF4_CODE when None
    nested_absmax: torch.Tensor | None = None  # fp32 (ceil(n_blocks / nested_blocksize),)
    nested_code: torch.Tensor | None = None  # fp32 (256,)
    nested_blocksize: int = 256
    offset: torch.Tensor | None = None  # fp32 scalar
    # the kernel's table and scale operands, checked and made at the first dequantisation (`operands`); the
    # fields above are fixed from then on
    _operands: tuple[torch.Tensor, ...] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    @functools.cached_property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    @classmethod
    def from_bnb(cls, packed: torch.Tensor, quant_state) -> NF4Weight:
        """From a bitsandbytes `Params4bit` data tensor and its `QuantState` (read by attribute name)."""
        if getattr(quant_state, "quant_type", "nf4") != "nf4":
            raise ValueError(f"nf4: quant_type {quant_state.quant_type!r} is not supported (only nf4)")
        if packed.dtype != torch.uint8:  # quant_storage=bf16/fp32 (FSDP) holds the same bytes
            packed = packed.contiguous().view(torch.uint8)
        nested = bool(getattr(quant_state, "nested", False))
        state2 = quant_state.state2 if nested else None
        offset = quant_state.offset if nested else None
        if offset is not None and not isinstance(offset, torch.Tensor):
            offset = torch.tensor(float(offset), dtype=torch.float32, device=packed.device)
        return cls(
            packed=packed, absmax=quant_state.absmax, shape=tuple(quant_state.shape), dtype=quant_state.dtype,
            blocksize=int(quant_state.blocksize), code=quant_state.code,
            nested_absmax=None if state2 is None else state2.absmax,
            nested_code=None if state2 is None else state2.code,
            nested_blocksize=256 if state2 is None else int(state2.blocksize),
            offset=offset)

    def operands(self) -> tuple[torch.Tensor, ...]:
        """(code, absmax2, code2, offset) as the Triton kernel reads them (fp32, on the packed bytes'
        device), after `check`; made once. Without nested scales the last three are never read: the kernel
        gets tensors it already has."""
        if self._operands is None:
            self.check()
            device = self.packed.device
            code = (self.code if self.code is not None else _nf4_code(device)).to(device=device,
                                                                                 dtype=torch.float32)
            if self.nested:
                self._operands = (code, self.nested_absmax.float(), self.nested_code.float(),
                                  self.offset.float().reshape(1))
            else:
                self._operands = (code, self.absmax, code, code)
        return self._operands

    def check(self) -> None:
        n = self.numel
        if self.packed.dtype != torch.uint8 or self.packed.numel() != cdiv(n, 2):
            raise ValueError(f"nf4: packed must be uint8 with {cdiv(n, 2)} bytes for shape {self.shape}, got "
                             f"{self.packed.dtype} with {self.packed.numel()}")
        if self.blocksize & (self.blocksize - 1) or self.blocksize < 2:
            raise ValueError(f"nf4: blocksize must be a power of two >= 2, got {self.blocksize}")
        if self.absmax.numel() != cdiv(n, self.blocksize):
            raise ValueError(f"nf4: absmax has {self.absmax.numel()} entries, expected "
                             f"{cdiv(n, self.blocksize)}")
        if self.nested and (self.nested_code is None or self.offset is None):
            raise ValueError("nf4: a nested (double-quantised) absmax needs nested_code and offset")


@jit
def _nf4_dequant_fwd_kernel(
    packed_ptr, absmax_ptr, code_ptr, absmax2_ptr, code2_ptr, offset_ptr, out_ptr, n,
    BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, HALF: tl.constexpr,
    ROWS: tl.constexpr,
):
    # A program dequantises ROWS quantisation blocks, one block a row: (ROWS, HALF = BLOCKSIZE / 2) bytes,
    # each row's scale read once and broadcast along it.
    blk = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    n_bytes = (n + 1) // 2
    byte = blk[:, None] * HALF + tl.arange(0, HALF)[None, :]  # (ROWS, HALF)
    q = tl.load(packed_ptr + byte, mask=byte < n_bytes, other=0)
    row_ok = blk * HALF < n_bytes
    if NESTED:
        qa = tl.load(absmax_ptr + blk, mask=row_ok, other=0).to(tl.int32)
        scale2 = tl.load(absmax2_ptr + blk // NESTED_BLOCKSIZE, mask=row_ok, other=0.0)
        scale = tl.load(code2_ptr + qa) * scale2 + tl.load(offset_ptr)
    else:
        scale = tl.load(absmax_ptr + blk, mask=row_ok, other=0.0).to(tl.float32)
    hi = tl.load(code_ptr + (q >> 4).to(tl.int32)) * scale[:, None]  # the table gathers hit one cache line
    lo = tl.load(code_ptr + (q & 0xF).to(tl.int32)) * scale[:, None]
    vals = tl.interleave(hi, lo)  # (ROWS, BLOCKSIZE): element 2i from the high nibble, 2i+1 from the low
    elem = blk[:, None] * BLOCKSIZE + tl.arange(0, BLOCKSIZE)[None, :]
    tl.store(out_ptr + elem, to_dtype(vals, out_ptr.dtype.element_ty), mask=elem < n)


_code_cache: dict[torch.device, torch.Tensor] = {}
_buffers = Scratch()


def _nf4_code(device: torch.device) -> torch.Tensor:
    if device not in _code_cache:
        _code_cache[device] = torch.tensor(NF4_CODE, dtype=torch.float32, device=device)
    return _code_cache[device]


def nf4_buffer(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat scratch tensor of `numel` elements, shared by every caller with this dtype and device.

    It grows to the largest request and is reused, so one dense copy of one layer's weight exists at a time
    (`kernels.scratch`: released before the loss). Its contents are valid only until the next dequantisation
    into it: use the result, then let it go.
    """
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _buffers.get((dtype, device), numel, dtype, device)


def _launch(w: NF4Weight, out: torch.Tensor, block_bytes: int = _BLOCK_BYTES, num_warps: int = 4) -> None:
    """Dequantise w into out; `block_bytes` (packed bytes a program reads) and `num_warps` are the tile
    choice."""
    n = w.numel
    if n == 0:
        return
    code, absmax2, code2, offset = w.operands()
    rows = max(1, block_bytes // (w.blocksize // 2))  # quantisation blocks per program
    _nf4_dequant_fwd_kernel[(cdiv(cdiv(n, w.blocksize), rows),)](
        w.packed, w.absmax, code, absmax2, code2, offset, out, n,
        BLOCKSIZE=w.blocksize, NESTED=w.nested, NESTED_BLOCKSIZE=w.nested_blocksize, HALF=w.blocksize // 2,
        ROWS=rows,
        # No fused multiply-add: bitsandbytes rounds code2[q] * absmax2 before adding the offset.
        enable_fp_fusion=False, num_warps=num_warps)


def dequantize_nf4(
    w: NF4Weight,
    out: torch.Tensor | None = None,
    reuse_buffer: bool = False,
    force_triton: bool | None = None,
) -> torch.Tensor:
    """The dense weight (`w.shape`, `w.dtype`). Triton on CUDA, the reference elsewhere.

    out: a contiguous tensor of w.numel elements to write into; reuse_buffer=True writes into the shared
    `nf4_buffer` instead (valid until the next dequantisation into it); neither allocates a new tensor.
    """
    if not use_triton(w.packed, w.absmax, force=force_triton):
        w.check()
        dense = dequantize_nf4_reference(w)
        if out is None and not reuse_buffer:
            return dense
        target = out if out is not None else nf4_buffer(w.numel, w.dtype, w.packed.device)
        return target.view(-1).copy_(dense.view(-1)).view(w.shape)
    w.operands()  # checks w first
    if out is None:
        out = nf4_buffer(w.numel, w.dtype, w.packed.device) if reuse_buffer else torch.empty(
            w.shape, dtype=w.dtype, device=w.packed.device)
    if out.numel() != w.numel or not out.is_contiguous() or out.dtype != w.dtype:
        raise ValueError(f"nf4: out must be a contiguous {w.dtype} tensor of {w.numel} elements, got "
                         f"{out.dtype} {tuple(out.shape)}")
    _launch(w, out)
    return out.view(w.shape)


def dequantize_nf4_reference(w: NF4Weight) -> torch.Tensor:
    n, device = w.numel, w.packed.device
    if w.nested:
        code2 = w.nested_code.float()
        scale2 = w.nested_absmax.float().repeat_interleave(w.nested_blocksize)[: w.absmax.numel()]
        absmax = code2[w.absmax.long()] * scale2 + w.offset.float()
    else:
        absmax = w.absmax.float()
    q = w.packed.reshape(-1)
    nibbles = torch.stack((q >> 4, q & 0xF), dim=-1).reshape(-1)[:n].long()  # (n,), high nibble first
    code = (w.code if w.code is not None else _nf4_code(device)).float().to(device)
    vals = code[nibbles] * absmax.repeat_interleave(w.blocksize)[:n]
    return vals.to(w.dtype).view(w.shape)


def quantize_nf4(weight: torch.Tensor, blocksize: int = 64, nested: bool = False) -> NF4Weight:
    """Quantise a dense weight to NF4 in bitsandbytes' layout (plain torch; for tests and CPU tooling).

    Nearest NF4 value per element after dividing by the block's absmax; the nested absmax uses a linear
    signed 256-entry table (bitsandbytes uses its dynamic map; the dequantiser takes either table).
    """
    flat = weight.detach().float().reshape(-1)
    n = flat.numel()
    n_blocks = cdiv(n, blocksize)
    padded = torch.zeros(n_blocks * blocksize, device=flat.device)
    padded[:n] = flat
    blocks = padded.view(n_blocks, blocksize)  # (n_blocks, bs)
    absmax = blocks.abs().amax(dim=1).clamp_min(1e-12)
    code = _nf4_code(flat.device)
    idx = ((blocks / absmax[:, None])[..., None] - code).abs().argmin(dim=-1).reshape(-1)[:n]
    if n % 2:
        idx = torch.cat((idx, idx.new_zeros(1)))
    packed = ((idx[0::2] << 4) | idx[1::2]).to(torch.uint8)
    w = NF4Weight(packed=packed, absmax=absmax, shape=tuple(weight.shape), dtype=weight.dtype,
                  blocksize=blocksize)
    if nested:
        offset = absmax.mean()
        centred = absmax - offset
        nb2 = cdiv(n_blocks, 256)
        pad2 = torch.zeros(nb2 * 256, device=flat.device)
        pad2[:n_blocks] = centred
        scale2 = pad2.view(nb2, 256).abs().amax(dim=1).clamp_min(1e-12)  # (nb2,)
        code2 = torch.linspace(-1, 1, 256, device=flat.device)
        q2 = ((pad2.view(nb2, 256) / scale2[:, None] + 1) * 127.5).round().clamp(0, 255)
        w.absmax = q2.reshape(-1)[:n_blocks].to(torch.uint8)
        w.nested_absmax, w.nested_code, w.offset = scale2, code2, offset
    return w
