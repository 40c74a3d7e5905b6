"""fasttune's own quantizer into llama.cpp's K-quant blocks (Q3_K, Q4_K, Q5_K, Q6_K) and IQ4_NL, in torch;
with an importance matrix also Q5_0 and Q5_1 (the K-quants' fallbacks for rows of partial super-blocks).

Every function works on a whole tensor at once on any device (a CUDA GPU when the export runs there)
and returns the bytes llama.cpp reads: one row of blocks per tensor row, the layout the `gguf` package's
dequantizers decode. A super-block holds 256 values:

    Q4_K (144 B): d f16 | dmin f16 | 12 B of eight 6-bit scales and mins | 128 B of 4-bit q
    Q5_K (176 B): d f16 | dmin f16 | 12 B scales/mins | 32 B high bits | 128 B low nibbles
                  x = d * sc[j] * q - dmin * m[j] per sub-block j of 32, q in 0..15 (0..31 for Q5_K)
    Q6_K (210 B): 128 B low nibbles | 64 B high 2-bit pairs | 16 int8 scales | d f16
    Q3_K (110 B): 32 B high-bit mask | 64 B low 2-bit pairs | 12 B of sixteen 6-bit scales | d f16
                  x = d * sc[j] * q per sub-block j of 16, q in -32..31 (-4..3 for Q3_K)
    IQ4_NL (18 B per 32 values): d f16 | 16 B of 4-bit indices into a fixed non-linear table
    Q5_0 (22 B per 32): d f16 | 4 B fifth bits | 16 B nibbles, x = d * (q - 16)
    Q5_1 (24 B per 32): d f16 | m f16 | 4 B fifth bits | 16 B nibbles, x = d * q + m

Each sub-block's scale (and min) is chosen by trying a grid of candidate scales around the range fit,
rounding, solving the weighted least-squares scale (and min) for those integers and keeping the one with
the least weighted error. The sub-block scales are then themselves quantized against one f16 scale
per super-block and the integers recomputed with the scales as stored, so what llama.cpp decodes is
what the search measured.

The error weights: without an importance matrix they favour the larger magnitudes. With one (`importance`:
the mean squared activation of each input column, see imatrix.py) they are llama.cpp's for a quantization
with an imatrix: importance * sqrt(sigma2 + x^2), sigma2 being twice the mean square of the super-block
(of the 32-block for IQ4_NL, once the mean square of the whole row for Q5_0/Q5_1), and the importance
alone for Q6_K; and the 6-bit sub-block scales (and mins) are searched against the f16 super-block scale
weighted by each sub-block's summed weight, where the plain path maps the largest to 63.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

Q = gguf.GGMLQuantizationType
QK_K = 256
IQ4_NL_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
TYPES = (Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL)
WITH_IMPORTANCE = (Q.Q5_0, Q.Q5_1)  # written here only with an importance matrix (else the `gguf` package)
_CHUNK = {"cpu": 1 << 16, "cuda": 1 << 24}  # values per step: cache-sized on a CPU, large on a GPU
_GRID = torch.linspace(-1.0, 1.0, 21).tolist()  # candidate offsets of the integer range


def _f16(x: torch.Tensor) -> torch.Tensor:
    """Round to f16 and back: the scale as llama.cpp will read it."""
    return x.to(torch.float16).to(torch.float32)


def _f16_bytes(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(x.shape[0], 2)  # (N, 2)


def _weights(
    x: torch.Tensor, importance: torch.Tensor | None, sigma2: torch.Tensor | None = None
) -> torch.Tensor:
    """Per-value weights of the error. Without importance: |x| plus the sub-block's RMS. With it:
    importance * sqrt(sigma2 + x^2), sigma2 (S, 1) by default twice the mean square of each row of x."""
    if importance is None:
        return x.abs() + x.square().mean(-1, keepdim=True).sqrt()
    if sigma2 is None:
        sigma2 = 2 * x.square().mean(-1, keepdim=True)
    return importance * (sigma2 + x.square()).sqrt()


def _super_sigma2(x: torch.Tensor, n_sub: int) -> torch.Tensor:
    """Twice the mean square of each super-block of x (N, 256), once per sub-block: (N * n_sub, 1)."""
    return (2 * x.square().mean(-1)).repeat_interleave(n_sub)[:, None]


def _weighted_scale_ints(v: torch.Tensor, sw: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative sub-block values v (N, k) -> (f16 scale (N,), ints 0..nmax (N, k)) with the least error
    weighted by sw (N, k): candidates (nmax + 0.1 i) / max for i in -4..4, the least-squares scale for
    the best one's integers, rounded to f16, the integers recomputed against it."""
    peak = v.amax(-1)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    best_err = torch.full_like(peak, float("inf"))
    best = torch.zeros_like(v)
    for i in range(-4, 5):
        iscale = (nmax + 0.1 * i) / safe
        q = (v * iscale[:, None]).round().clamp(0, nmax)
        err = (sw * (v - q / iscale[:, None]).square()).sum(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better[:, None], q, best)
    swq = sw * best
    d = (swq * v).sum(-1) / torch.linalg.vecdot(swq, best).clamp(min=1e-30)
    d = _f16(torch.where(peak > 0, d, torch.zeros_like(d)))
    return d, _ints(v, d[:, None].expand_as(v), 0, nmax)


def _fit_affine(x: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (scale >= 0, offset <= 0) per sub-block with x ~ scale * q + offset, q in 0..nmax.

    x, w: (S, n). Returns scale, offset: (S,). The error of each candidate comes from the weighted sums
    alone: sum w (s q + o - x)^2 = s^2 Swqq + 2 s o Swq - 2 s Swqx + o^2 Sw - 2 o Swx + Swxx.
    """
    lo = x.amin(-1).clamp(max=0.0)
    span = (x.amax(-1) - lo).clamp(min=1e-30)
    sw, swx, swxx = w.sum(-1), (w * x).sum(-1), (w * x * x).sum(-1)
    shifted = x - lo[:, None]
    best_err = torch.full_like(lo, float("inf"))
    best_scale, best_off = span / nmax, lo.clone()
    for delta in _GRID:
        q = (shifted * ((nmax + delta) / span)[:, None]).round_().clamp_(0, nmax)
        wq = w * q
        swq, swqq, swqx = wq.sum(-1), torch.linalg.vecdot(wq, q), torch.linalg.vecdot(wq, x)
        det = sw * swqq - swq * swq
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        scale = torch.where(ok, (sw * swqx - swq * swx) / det, span / nmax)
        off = torch.where(ok, (swqq * swx - swq * swqx) / det, lo)
        # the block stores the offset as -dmin * m with m >= 0: refit the scale alone where it came out > 0
        pos = off > 0
        scale = torch.where(pos, swqx / swqq.clamp(min=1e-30), scale).clamp(min=0.0)
        off = off.clamp(max=0.0)
        err = scale * scale * swqq + 2 * scale * off * swq - 2 * scale * swqx
        err = err + off * off * sw - 2 * off * swx + swxx
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, scale, best_scale)
        best_off = torch.where(better, off, best_off)
    return best_scale, best_off


def _fit_symmetric(x: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """Best signed scale per sub-block with x ~ scale * q, q in -nmax..nmax-1. x, w: (S, n) -> (S,).

    The value of largest magnitude goes to the wider end (-nmax) of the range, hence the negative sign.
    For the least-squares scale s = Swqx / Swqq the error is Swxx - s Swqx, so the best candidate is the
    one with the largest s Swqx.
    """
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True)).squeeze(-1)
    zero = peak == 0
    peak = torch.where(zero, torch.ones_like(peak), peak)
    best_gain = torch.full_like(peak, -1.0)
    best_scale = torch.zeros_like(peak)
    for delta in _GRID:
        q = (x * (-(nmax + delta) / peak)[:, None]).round_().clamp_(-nmax, nmax - 1)
        wq = w * q
        swqq, swqx = torch.linalg.vecdot(wq, q), torch.linalg.vecdot(wq, x)
        scale = swqx / swqq.clamp(min=1e-30)
        gain = scale * swqx
        better = gain > best_gain
        best_gain = torch.where(better, gain, best_gain)
        best_scale = torch.where(better, scale, best_scale)
    return torch.where(zero, torch.zeros_like(best_scale), best_scale)


def _ints(x: torch.Tensor, step: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """round(x / step) clamped to [lo, hi]; 0 where the step is 0."""
    safe = torch.where(step == 0, torch.ones_like(step), step)
    return torch.where(step == 0, torch.zeros_like(x), (x / safe).round().clamp(lo, hi))


def _scales_6bit_pairs(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and eight 6-bit mins (N, 8) uint8 -> the 12 packed bytes (N, 12) of Q4_K/Q5_K.

    bytes 0-3: sc[0..3] | top two bits of sc[4..7] in bits 6-7; bytes 4-7: the same for the mins;
    bytes 8-11: low nibbles of sc[4..7] | low nibbles of m[4..7] << 4.
    """
    a = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    b = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    c = (sc[:, 4:] & 0xF) | ((m[:, 4:] & 0xF) << 4)
    return torch.cat([a, b, c], dim=1)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, 8, 32) 4-bit values -> (N, 128): byte i of group k = q[2k][i] | q[2k+1][i] << 4."""
    q = q.reshape(q.shape[0], 4, 2, 32)
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(q.shape[0], 128)


def _q45k(x: torch.Tensor, importance: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    xs = x.reshape(n * 8, 32)
    imp = None if importance is None else importance.reshape(n * 8, 32)
    w = _weights(xs, imp, _super_sigma2(x, 8))
    scale, off = _fit_affine(xs, w, nmax)
    scale, mins = scale.reshape(n, 8), (-off).reshape(n, 8)
    if imp is None:
        d = _f16(scale.amax(-1) / 63)  # (N,)
        dmin = _f16(mins.amax(-1) / 63)
        sc = _ints(scale, d[:, None].expand_as(scale), 0, 63)
        m = _ints(mins, dmin[:, None].expand_as(mins), 0, 63)
    else:
        sw = w.sum(-1).reshape(n, 8)
        d, sc = _weighted_scale_ints(scale, sw, 63)
        dmin, m = _weighted_scale_ints(mins, sw, 63)
    step = (d[:, None] * sc)[:, :, None]  # (N, 8, 1)
    shift = (dmin[:, None] * m)[:, :, None]
    q = _ints(x.reshape(n, 8, 32) + shift, step.expand(n, 8, 32), 0, nmax)
    values = (step * q - shift).reshape(n, QK_K)
    q, sc, m = q.to(torch.uint8), sc.to(torch.uint8), m.to(torch.uint8)
    parts = [_f16_bytes(d), _f16_bytes(dmin), _scales_6bit_pairs(sc, m)]
    if nmax == 31:
        bits = ((q >> 4) & 1).to(torch.int32)  # (N, 8, 32): bit j of qh[i] is the fifth bit of sub-block j
        qh = (bits << torch.arange(8, device=x.device, dtype=torch.int32)[None, :, None]).sum(1)
        parts.append(qh.to(torch.uint8))
    parts.append(_nibbles(q & 0xF))
    return torch.cat(parts, dim=1), values


def _symmetric_blocks(
    x: torch.Tensor, importance: torch.Tensor | None, nmax: int, smax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sixteen sub-blocks of 16 with signed scales quantized to -smax..smax-1 against one f16 d.

    Returns (q + nmax as uint8 (N, 256), stored scales (N, 16) as int, d (N,), decoded values (N, 256)).
    """
    n = x.shape[0]
    xs = x.reshape(n * 16, 16)
    if importance is None:
        w = _weights(xs, None)
    elif nmax == 32:  # Q6_K: llama.cpp weighs by the importance alone
        w = importance.reshape(n * 16, 16)
    else:
        w = _weights(xs, importance.reshape(n * 16, 16), _super_sigma2(x, 16))
    scale = _fit_symmetric(xs, w, nmax).reshape(n, 16)
    if importance is None or nmax == 32:
        peak = scale.gather(-1, scale.abs().argmax(-1, keepdim=True)).squeeze(-1)  # (N,)
        d = _f16(-peak / smax)
    else:  # Q3_K with an imatrix: the sixteen scales fitted like values, weighted by each sub-block's weight
        d = _f16(_fit_symmetric(scale, w.sum(-1).reshape(n, 16), smax))
    sc = _ints(scale, d[:, None].expand_as(scale), -smax, smax - 1)
    step = (d[:, None] * sc)[:, :, None]  # (N, 16, 1)
    q = _ints(x.reshape(n, 16, 16), step.expand(n, 16, 16), -nmax, nmax - 1)
    values = (step * q).reshape(n, QK_K)
    return (q + nmax).to(torch.uint8).reshape(n, QK_K), sc, d, values


def _shifted_or(parts: torch.Tensor, width: int) -> torch.Tensor:
    """OR together parts[:, :, k] << (k * width) along dim 2: (N, a, k, b) -> (N, a, b) uint8."""
    shifts = torch.arange(parts.shape[2], device=parts.device, dtype=torch.int32) * width
    shifts = shifts[None, None, :, None]
    return (parts.to(torch.int32) << shifts).sum(2).to(torch.uint8)


def _q6k(x: torch.Tensor, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    q, sc, d, values = _symmetric_blocks(x, importance, 32, 128)
    # element h*128 + k*64 + i: low nibble in byte h*64 + i, bits 4k..4k+3
    ql = _shifted_or((q & 0xF).reshape(n, 2, 2, 64), 4).reshape(n, 128)
    # element h*128 + k*32 + i: high two bits in byte h*32 + i, bits 2k..2k+1
    qh = _shifted_or((q >> 4).reshape(n, 2, 4, 32), 2).reshape(n, 64)
    scales = sc.to(torch.int8).view(torch.uint8)
    return torch.cat([ql, qh, scales, _f16_bytes(d)], dim=1), values


def _q3k(x: torch.Tensor, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    n = x.shape[0]
    q, sc, d, values = _symmetric_blocks(x, importance, 4, 32)
    # element b*32 + i: third bit in bit b of hmask byte i
    hmask = _shifted_or((q >> 2).reshape(n, 1, 8, 32), 1).reshape(n, 32)
    qs = _shifted_or((q & 3).reshape(n, 2, 4, 32), 2).reshape(n, 64)  # element h*128 + k*32 + i
    raw = (sc + 32).to(torch.uint8)  # (N, 16), 6 bits each
    low = (raw[:, :8] & 0xF) | ((raw[:, 8:] & 0xF) << 4)  # scale j < 8 in byte j, j >= 8 in byte j - 8 << 4
    high = _shifted_or((raw >> 4).reshape(n, 1, 4, 4), 2).reshape(n, 4)  # scale k*4 + b: byte b, bits 2k
    return torch.cat([hmask, qs, low, high, _f16_bytes(d)], dim=1), values


def _nearest_iq4(v: torch.Tensor, lut: torch.Tensor) -> torch.Tensor:
    """Index of the IQ4_NL table entry nearest to each value of v.

    The table holds integers, so every midpoint between neighbours is a multiple of 1/2 and floor(2 v)
    alone decides which side of it v lies on: `lut` maps floor(2 v) (clamped to the table's range) to
    the index.
    """
    u = (v * 2).floor_().clamp_(-256, 227).to(torch.int64) + 256
    return lut[u]


def _iq4_lut(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    table = torch.tensor(IQ4_NL_VALUES, dtype=torch.float32)
    centres = torch.arange(-256, 228, dtype=torch.float32) / 2 + 0.25  # inside each half-unit interval
    lut = (centres[:, None] - table).abs().argmin(-1)
    return table.to(device), lut.to(device)


def _iq4nl(x: torch.Tensor, importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, 32) blocks."""
    table, lut = _iq4_lut(x.device)
    w = _weights(x, importance)
    peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))  # (N, 1)
    zero = peak == 0
    peak = torch.where(zero, torch.ones_like(peak), peak)
    best_gain = torch.full_like(peak, -1.0)
    best_d = torch.zeros_like(peak)
    for delta in _GRID:
        d = peak / (-127 + 4 * delta)  # the largest magnitude lands near the table's end, -127
        k = table[_nearest_iq4(x / d, lut)]
        wk = w * k
        swkx, swkk = (wk * x).sum(-1, keepdim=True), (wk * k).sum(-1, keepdim=True).clamp(min=1e-30)
        d = swkx / swkk  # least squares for these indices; the error is Swxx - d Swkx
        better = d * swkx > best_gain
        best_gain, best_d = torch.where(better, d * swkx, best_gain), torch.where(better, d, best_d)
    d = _f16(torch.where(zero, torch.zeros_like(best_d), best_d))
    safe = torch.where(d == 0, torch.ones_like(d), d)
    idx = _nearest_iq4(x / safe, lut)  # (N, 32)
    values = d * table[idx]
    qs = (idx[:, :16] | (idx[:, 16:] << 4)).to(torch.uint8)  # element i: low nibble of byte i, 16 + i: high
    return torch.cat([_f16_bytes(d.squeeze(-1)), qs], dim=1), values


def _fifth_bits(q: torch.Tensor) -> torch.Tensor:
    """Q5_0/Q5_1's 32-bit qh of (N, 32) 5-bit values: bit e holds the fifth bit of element e (N, 4)."""
    n = q.shape[0]
    return _shifted_or((q >> 4).reshape(n, 4, 8, 1), 1).reshape(n, 4)


def _low_nibbles32(q: torch.Tensor) -> torch.Tensor:
    """(N, 32) -> (N, 16): element i in the low nibble of byte i, element 16 + i in its high nibble."""
    return (q[:, :16] & 0xF) | ((q[:, 16:] & 0xF) << 4)


def _q50(
    x: torch.Tensor, importance: torch.Tensor, row_ms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (N, 32) blocks; row_ms (N, 1): the mean square of each block's whole row (llama.cpp's sigma2)."""
    d = _f16(_fit_symmetric(x, _weights(x, importance, row_ms), 16))[:, None]  # (N, 1)
    q = _ints(x, d.expand_as(x), -16, 15)
    values = d * q
    q = (q + 16).to(torch.uint8)
    return torch.cat([_f16_bytes(d.squeeze(-1)), _fifth_bits(q), _low_nibbles32(q)], dim=1), values


def _q51(
    x: torch.Tensor, importance: torch.Tensor, row_ms: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    scale, off = _fit_affine(x, _weights(x, importance, row_ms), 31)
    d, m = _f16(scale)[:, None], _f16(off)[:, None]  # (N, 1)
    q = _ints(x - m, d.expand_as(x), 0, 31)
    values = d * q + m
    q = q.to(torch.uint8)
    parts = [_f16_bytes(d.squeeze(-1)), _f16_bytes(m.squeeze(-1)), _fifth_bits(q), _low_nibbles32(q)]
    return torch.cat(parts, dim=1), values


_BLOCKS = {  # (blocks, importance or None, mean square of each block's row) -> (bytes, decoded values)
    Q.Q4_K: lambda x, imp, _: _q45k(x, imp, 15),
    Q.Q5_K: lambda x, imp, _: _q45k(x, imp, 31),
    Q.Q6_K: lambda x, imp, _: _q6k(x, imp),
    Q.Q3_K: lambda x, imp, _: _q3k(x, imp),
    Q.IQ4_NL: lambda x, imp, _: _iq4nl(x, imp),
    Q.Q5_0: _q50,
    Q.Q5_1: _q51,
}


def _quantize(
    t: torch.Tensor, qtype: Q, importance: torch.Tensor | None, keep_values: bool
) -> tuple[np.ndarray, torch.Tensor | None]:
    if qtype not in TYPES and not (qtype in WITH_IMPORTANCE and importance is not None):
        raise ValueError(
            f"fasttune's quantizer writes {', '.join(q.name for q in TYPES)} (with an importance matrix also "
            f"{', '.join(q.name for q in WITH_IMPORTANCE)}), not {qtype.name}"
        )
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = t.shape
    if cols % block:
        raise ValueError(f"{qtype.name} needs rows that are a multiple of {block} values; these have {cols}")
    row_ms = t.detach().to(torch.float32).square().mean(-1).repeat_interleave(cols // block)[:, None]
    x = t.detach().to(torch.float32).reshape(-1, block)  # (blocks, block)
    imp = None
    if importance is not None:
        imp = importance.to(x.device, torch.float32).reshape(cols)
        if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
            raise ValueError("the importance matrix holds a negative or non-finite value")
        # a column no sample activated would zero whole sub-blocks' weights: floor it far below the rest
        imp = imp.clamp(min=float(imp.max()) * 1e-6) if float(imp.max()) > 0 else None
    if imp is not None:
        imp = imp.reshape(1, cols).expand(rows, cols).reshape(-1, block)
    out = np.empty((x.shape[0], size), dtype=np.uint8)
    values = torch.empty_like(x) if keep_values else None
    step = max(1, _CHUNK.get(x.device.type, _CHUNK["cpu"]) // block)
    for i in range(0, x.shape[0], step):
        part = None if imp is None else imp[i : i + step]
        raw, val = _BLOCKS[qtype](x[i : i + step], part, row_ms[i : i + step])
        out[i : i + step] = raw.cpu().numpy()
        if values is not None:
            values[i : i + step] = val
    decoded = None if values is None else values.reshape(rows, cols)
    return out.reshape(rows, cols // block * size), decoded


def quantize_with_values(
    t: torch.Tensor, qtype: Q, importance: torch.Tensor | None = None
) -> tuple[np.ndarray, torch.Tensor]:
    """Quantize a 2-D tensor (rows, cols) into `qtype` blocks on t's device.

    Returns the block bytes (rows, cols // block * type_size) uint8 and the values they decode to
    (rows, cols) fp32, on t's device. importance: optional (cols,) mean squared activation of each input
    column (an importance matrix), which weighs the error as llama.cpp's quantizer does with an imatrix.
    """
    raw, values = _quantize(t, qtype, importance, keep_values=True)
    return raw, values


def quantize(t: torch.Tensor, qtype: Q, importance: torch.Tensor | None = None) -> np.ndarray:
    """The block bytes of `quantize_with_values`, without keeping the decoded values."""
    return _quantize(t, qtype, importance, keep_values=False)[0]
