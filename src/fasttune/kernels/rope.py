"""Rotary position embedding on q and k, rotate-half convention (as transformers' Llama).

q: (B, T, n_heads, head_dim), k: (B, T, n_kv_heads, head_dim), cos/sin: (B, T, head_dim) (B may be 1).
Forward, with x = [x1, x2], cos = [c1, c2], sin = [s1, s2] split in halves of head_dim:
    out = x * cos + rotate_half(x) * sin,   rotate_half([x1, x2]) = [-x2, x1]
    out1 = x1 c1 - x2 s1,   out2 = x2 c2 + x1 s2
Backward (the transpose of that linear map), for upstream g = [g1, g2]:
    dx1 = g1 c1 + g2 s2,    dx2 = g2 c2 - g1 s1
which is the forward map with (s1, s2) replaced by (-s2, -s1): a rotation by -sin when c1 = c2, s1 = s2.
One launch rotates q and k together, each program a tile of (head-rows, head_dim / 2) of q or of k; math
in fp32, one rounding to the output dtype. No gradient flows to cos/sin (they are not trained).
"""

from __future__ import annotations

import torch

from fasttune.kernels._dispatch import cdiv, jit, next_pow2, tl, to_dtype, use_triton


@jit
def _rope_rows(
    x_ptr, o_ptr, cos_ptr, sin_ptr, tile, n_rows, n_heads, seq_len, s_b, s_t, s_h, sc_b, sc_t,
    HALF: tl.constexpr, ROWS: tl.constexpr, D_BLOCK: tl.constexpr, BACKWARD: tl.constexpr,
):
    """Rotate one tile of ROWS head-rows of x (B, T, heads, hd) into o (contiguous, same shape)."""
    rows = tile.to(tl.int64) * ROWS + tl.arange(0, ROWS)  # flat (b, t, head) indices
    rmask = rows < n_rows
    head = rows % n_heads
    tok = rows // n_heads
    b = tok // seq_len
    t = tok % seq_len
    d = tl.arange(0, D_BLOCK)
    m = rmask[:, None] & (d < HALF)[None, :]
    cs = (b * sc_b + t * sc_t)[:, None] + d[None, :]  # (ROWS, D_BLOCK) offsets into cos/sin
    c1 = tl.load(cos_ptr + cs, mask=m, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + cs + HALF, mask=m, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + cs, mask=m, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + cs + HALF, mask=m, other=0.0).to(tl.float32)
    if BACKWARD:  # transpose: (s1, s2) -> (-s2, -s1)
        s_first = s1
        s1 = -s2
        s2 = -s_first
    src = x_ptr + (b * s_b + t * s_t + head * s_h)[:, None] + d[None, :]
    x1 = tl.load(src, mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=m, other=0.0).to(tl.float32)
    dst = o_ptr + rows[:, None] * (2 * HALF) + d[None, :]
    tl.store(dst, to_dtype(x1 * c1 - x2 * s1, o_ptr.dtype.element_ty), mask=m)
    tl.store(dst + HALF, to_dtype(x2 * c2 + x1 * s2, o_ptr.dtype.element_ty), mask=m)


@jit
def _rope_fwd_kernel(
    q_ptr, k_ptr, qo_ptr, ko_ptr, cos_ptr, sin_ptr,
    seq_len, sq_b, sq_t, sq_h, sk_b, sk_t, sk_h, sc_b, sc_t, n_q_rows, n_k_rows, n_q_heads, n_k_heads,
    n_q_tiles,
    HALF: tl.constexpr, ROWS: tl.constexpr, D_BLOCK: tl.constexpr, BACKWARD: tl.constexpr,
):
    # One launch for both: the first n_q_tiles programs rotate q's head-rows, the rest k's.
    pid = tl.program_id(0)
    if pid < n_q_tiles:
        _rope_rows(q_ptr, qo_ptr, cos_ptr, sin_ptr, pid, n_q_rows, n_q_heads, seq_len, sq_b, sq_t, sq_h,
                   sc_b, sc_t, HALF, ROWS, D_BLOCK, BACKWARD)
    else:
        _rope_rows(k_ptr, ko_ptr, cos_ptr, sin_ptr, pid - n_q_tiles, n_k_rows, n_k_heads, seq_len, sk_b,
                   sk_t, sk_h, sc_b, sc_t, HALF, ROWS, D_BLOCK, BACKWARD)


# The backward is the same kernel with BACKWARD=True; the alias keeps the file anatomy readable.
_rope_bwd_kernel = _rope_fwd_kernel


def _launch(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool):
    """Rotate q and k into fresh contiguous tensors (B, T, nh, hd) and (B, T, nkv, hd)."""
    B, T, nh, hd = q.shape
    nkv = k.shape[2]
    # Only the last dimension must be unit-stride; the others go to the kernel as strides.
    q = q if q.stride(-1) == 1 else q.contiguous()
    k = k if k.stride(-1) == 1 else k.contiguous()
    cos = cos.expand(B, T, hd)  # (B, T, hd); a batch of 1 broadcasts through stride 0
    sin = sin.expand(B, T, hd)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty((B, T, nh, hd), dtype=q.dtype, device=q.device)
    k_out = torch.empty((B, T, nkv, hd), dtype=k.dtype, device=k.device)
    if B * T == 0:
        return q_out, k_out
    half = hd // 2
    d_block = next_pow2(half)
    rows = max(1, min(64, 2048 // d_block))  # head-rows per program: a tile of about 2 x 2048 elements
    n_q_rows, n_k_rows = B * T * nh, B * T * nkv
    n_q_tiles = cdiv(n_q_rows, rows)
    _rope_fwd_kernel[(n_q_tiles + cdiv(n_k_rows, rows),)](
        q, k, q_out, k_out, cos, sin,
        T, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        cos.stride(0), cos.stride(1), n_q_rows, n_k_rows, nh, nkv, n_q_tiles,
        HALF=half, ROWS=rows, D_BLOCK=d_block, BACKWARD=backward,
    )
    return q_out, k_out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _launch(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, dq, dk):
        cos, sin = ctx.saved_tensors  # an unused output's gradient arrives as zeros (materialize_grads)
        dq, dk = _launch(dq, dk, cos, sin, backward=True)
        return dq, dk, None, None


def _check(q, k, cos, sin) -> None:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"apply_rope: q and k must be (B, T, heads, head_dim), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    B, T, _, hd = q.shape
    if k.shape[0] != B or k.shape[1] != T or k.shape[3] != hd or hd % 2:
        raise ValueError(f"apply_rope: k {tuple(k.shape)} does not match q {tuple(q.shape)} "
                         "(same B, T and an even head_dim)")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 3 or t.shape[0] not in (1, B) or t.shape[1] != T or t.shape[2] != hd:
            raise ValueError(f"apply_rope: {name} must be ({B} or 1, {T}, {hd}), got {tuple(t.shape)}")


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, force_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate q and k by the angles in cos/sin; returns (q, k). Triton on CUDA, else the reference."""
    _check(q, k, cos, sin)
    if use_triton(q, k, cos, sin, force=force_triton):
        return RoPEFunction.apply(q, k, cos, sin)
    return apply_rope_reference(q, k, cos, sin)


def rope_backward(
    dq: torch.Tensor, dk: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, force_triton: bool | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of `apply_rope`'s inputs from those of its outputs (the transpose of the rotation), for
    a backward that has the outputs' gradients without the forward's graph (`memory/kept_attention.py`).
    dq (B, T, nh, hd), dk (B, T, nkv, hd), any strides; returns contiguous tensors of those shapes."""
    _check(dq, dk, cos, sin)
    if use_triton(dq, dk, cos, sin, force=force_triton):
        return _launch(dq, dk, cos, sin, backward=True)
    return rope_backward_reference(dq, dk, cos, sin)


def rope_backward_reference(dq, dk, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """The module docstring's backward in fp32: dx1 = g1 c1 + g2 s2, dx2 = g2 c2 - g1 s1."""
    c1, c2 = cos.float().unsqueeze(2).chunk(2, dim=-1)  # (B, T, 1, hd / 2)
    s1, s2 = sin.float().unsqueeze(2).chunk(2, dim=-1)

    def back(g: torch.Tensor) -> torch.Tensor:
        g1, g2 = g.float().chunk(2, dim=-1)
        return torch.cat((g1 * c1 + g2 * s2, g2 * c2 - g1 * s1), dim=-1).to(g.dtype)

    return back(dq), back(dk)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope_reference(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    cos = cos.unsqueeze(2).to(q.dtype)  # (B, T, 1, hd)
    sin = sin.unsqueeze(2).to(q.dtype)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
