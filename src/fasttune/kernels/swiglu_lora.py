"""SwiGLU of gate/up outputs whose rank-r LoRA terms are added inside the kernel.

`lora_mlp` keeps the gate and up outputs without their adapter terms: g0 = x W_g^T (+ bias), u0 = x W_u^T,
each a plain product that writes its output once. The adapter terms are rank r (x A^T is (N, r)), so this
kernel adds them to a tile on the tensor cores for the price of reading two (N, r) and two (inter, r)
operands, instead of a separate (N, inter) write per projection that the product then reads back.

Forward, for xa_g = x A_g^T (N, r), b_g = s_g B_g (inter, r) (and the same for up), in fp32, h rounded once:
    g = g0 + xa_g b_g^T,  u = u0 + xa_u b_u^T
    h = g * sigma(g) * u
Backward, for upstream dh, recomputing g and u from the same operands (sigma = sigmoid(g)):
    du = dh * g * sigma                        (= dL/du0: u0 enters u with weight 1)
    dg = dh * u * sigma * (1 + g * (1 - sigma))
    d xa_g = dg b_g,  d b_g = dg^T xa_g        (and the same for up; `lora_mlp` computes these itself)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.kernels._dispatch import cdiv, interpreting, jit, next_pow2, tl, to_dtype, use_triton

_BLOCK_N, _BLOCK_I = 16, 128  # rows x intermediate columns per program: the fastest of nine tiles on an H100


@jit
def _lora_term(xa_ptr, bt_ptr, rows, cols, row_ok, col_ok, rank, s_xn, s_xr, s_br,
               BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr):
    """(rows, cols) tile of xa b^T in fp32 on the tensor cores, for xa (N, r) and bt = b^T (r, inter) with
    unit column stride. DOT_FP32: fp32 operands, kept whole ('ieee'), for fp32 inputs and for Triton's CPU
    interpreter (whose dot of bf16 operands is wrong); otherwise the 16-bit operands go in as they are."""
    r = tl.arange(0, BLOCK_R)
    r_ok = r < rank
    xa = tl.load(xa_ptr + rows[:, None] * s_xn + r[None, :] * s_xr, mask=row_ok[:, None] & r_ok[None, :],
                 other=0.0)  # (BLOCK_N, BLOCK_R)
    bt = tl.load(bt_ptr + r[:, None] * s_br + cols[None, :], mask=r_ok[:, None] & col_ok[None, :],
                 other=0.0)  # (BLOCK_R, BLOCK_I)
    if DOT_FP32:
        return tl.dot(xa.to(tl.float32), bt.to(tl.float32), input_precision="ieee")
    return tl.dot(xa, bt)


@jit
def _load_gate_up(g_ptr, u_ptr, xg_ptr, bg_ptr, xu_ptr, bu_ptr, rows, cols, row_ok, col_ok, rank,
                  s_gn, s_un, s_xgn, s_xgr, s_bgr, s_xun, s_xur, s_bur,
                  BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr):
    """The corrected (g, u) tiles in fp32."""
    mask = row_ok[:, None] & col_ok[None, :]
    g = tl.load(g_ptr + rows[:, None] * s_gn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * s_un + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g += _lora_term(xg_ptr, bg_ptr, rows, cols, row_ok, col_ok, rank, s_xgn, s_xgr, s_bgr, BLOCK_R, DOT_FP32)
    u += _lora_term(xu_ptr, bu_ptr, rows, cols, row_ok, col_ok, rank, s_xun, s_xur, s_bur, BLOCK_R, DOT_FP32)
    return g, u


@jit
def _swiglu_lora_fwd_kernel(g_ptr, u_ptr, xg_ptr, bg_ptr, xu_ptr, bu_ptr, h_ptr, n_rows, n_cols, rank,
                            s_gn, s_un, s_xgn, s_xgr, s_bgr, s_xun, s_xur, s_bur, s_hn,
                            BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
                            BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    g, u = _load_gate_up(g_ptr, u_ptr, xg_ptr, bg_ptr, xu_ptr, bu_ptr, rows, cols, row_ok, col_ok, rank,
                         s_gn, s_un, s_xgn, s_xgr, s_bgr, s_xun, s_xur, s_bur, BLOCK_R, DOT_FP32)
    h = g * tl.sigmoid(g) * u
    tl.store(h_ptr + rows[:, None] * s_hn + cols[None, :], to_dtype(h, h_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@jit
def _swiglu_lora_bwd_kernel(dh_ptr, g_ptr, u_ptr, xg_ptr, bg_ptr, xu_ptr, bu_ptr, dg_ptr, du_ptr,
                            n_rows, n_cols, rank, s_dhn, s_gn, s_un, s_xgn, s_xgr, s_bgr,
                            s_xun, s_xur, s_bur, s_dgn, s_dun, BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr,
                            BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    row_ok, col_ok = rows < n_rows, cols < n_cols
    mask = row_ok[:, None] & col_ok[None, :]
    g, u = _load_gate_up(g_ptr, u_ptr, xg_ptr, bg_ptr, xu_ptr, bu_ptr, rows, cols, row_ok, col_ok, rank,
                         s_gn, s_un, s_xgn, s_xgr, s_bgr, s_xun, s_xur, s_bur, BLOCK_R, DOT_FP32)
    dh = tl.load(dh_ptr + rows[:, None] * s_dhn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    du = dh * g * sig
    dg = dh * u * sig * (1.0 + g * (1.0 - sig))
    tl.store(du_ptr + rows[:, None] * s_dun + cols[None, :], to_dtype(du, du_ptr.dtype.element_ty), mask=mask)
    tl.store(dg_ptr + rows[:, None] * s_dgn + cols[None, :], to_dtype(dg, dg_ptr.dtype.element_ty), mask=mask)


def _check(g0, u0, xa_g, b_g, xa_u, b_u, dh=None) -> None:
    ok = g0.dim() == 2 and xa_g.dim() == 2
    if ok:
        (n, inter), r = g0.shape, xa_g.shape[1]
        ok = (u0.shape == g0.shape and xa_g.shape == (n, r) and xa_u.shape == (n, r)
              and b_g.shape == (inter, r) and b_u.shape == (inter, r)
              and g0.stride(1) == 1 and u0.stride(1) == 1
              and (dh is None or (dh.shape == g0.shape and dh.stride(1) == 1)))
    if not ok:
        raise ValueError(f"swiglu_lora: gate {tuple(g0.shape)}, up {tuple(u0.shape)}, xa {tuple(xa_g.shape)} "
                         f"/ {tuple(xa_u.shape)} and b {tuple(b_g.shape)} / {tuple(b_u.shape)} do not fit "
                         "(N, inter), (N, r), (inter, r) with unit column strides")


def _grid(n: int, inter: int) -> tuple[int, int]:
    return cdiv(n, _BLOCK_N), cdiv(inter, _BLOCK_I)


def _blocks(rank: int, dtype: torch.dtype) -> dict:
    return dict(BLOCK_N=_BLOCK_N, BLOCK_I=_BLOCK_I, BLOCK_R=max(16, next_pow2(rank)),
                DOT_FP32=dtype == torch.float32 or interpreting(), num_warps=4)


def _lora_operands(xa_g, b_g, xa_u, b_u) -> list:
    """Kernel arguments: each xa with its two strides, each b transposed to (r, inter) with its row stride
    (a rank index's row is then read coalesced; b is small enough to copy per call)."""
    bt_g, bt_u = b_g.t().contiguous(), b_u.t().contiguous()
    return [xa_g, bt_g, xa_u, bt_u], [*xa_g.stride(), bt_g.stride(0), *xa_u.stride(), bt_u.stride(0)]


def _swiglu_lora_fwd(g0, u0, xa_g, b_g, xa_u, b_u) -> torch.Tensor:
    """h (N, inter) from the adapter-free gate/up outputs and their adapter operands (module docstring)."""
    _check(g0, u0, xa_g, b_g, xa_u, b_u)
    n, inter = g0.shape
    h = torch.empty((n, inter), dtype=g0.dtype, device=g0.device)
    if h.numel():
        ops, strides = _lora_operands(xa_g, b_g, xa_u, b_u)
        _swiglu_lora_fwd_kernel[_grid(n, inter)](
            g0, u0, *ops, h, n, inter, xa_g.shape[1], g0.stride(0), u0.stride(0), *strides, h.stride(0),
            **_blocks(xa_g.shape[1], g0.dtype))
    return h


def _swiglu_lora_bwd(dh, g0, u0, xa_g, b_g, xa_u, b_u, inplace: bool = False):
    """(dg, du), the gradients of the corrected g and u (= of g0 and u0); `inplace` writes them over g0, u0
    (each element is read before it is written, and no other program reads it)."""
    _check(g0, u0, xa_g, b_g, xa_u, b_u, dh)
    n, inter = g0.shape
    dg, du = (g0, u0) if inplace else (torch.empty_like(g0), torch.empty_like(u0))
    if dg.numel():
        ops, strides = _lora_operands(xa_g, b_g, xa_u, b_u)
        _swiglu_lora_bwd_kernel[_grid(n, inter)](
            dh, g0, u0, *ops, dg, du, n, inter, xa_g.shape[1], dh.stride(0), g0.stride(0), u0.stride(0),
            *strides, dg.stride(0), du.stride(0), **_blocks(xa_g.shape[1], g0.dtype))
    return dg, du


def _corrected(g0, xa, b) -> torch.Tensor:
    """g0 + xa b^T in fp32, as the kernel sums it before the activation."""
    return torch.addmm(g0.float(), xa.float(), b.float().t())


class SwiGLULoRAFunction(torch.autograd.Function):
    """h = silu(g0 + xa_g b_g^T) * (u0 + xa_u b_u^T); gradients for all six inputs."""

    @staticmethod
    def forward(ctx, g0, u0, xa_g, b_g, xa_u, b_u):
        ctx.save_for_backward(g0, u0, xa_g, b_g, xa_u, b_u)
        return _swiglu_lora_fwd(g0, u0, xa_g, b_g, xa_u, b_u)

    @staticmethod
    def backward(ctx, dh):
        g0, u0, xa_g, b_g, xa_u, b_u = ctx.saved_tensors
        dg, du = _swiglu_lora_bwd(dh.contiguous(), g0, u0, xa_g, b_g, xa_u, b_u)
        return dg, du, dg @ b_g, dg.t() @ xa_g, du @ b_u, du.t() @ xa_u


def swiglu_lora(g0, u0, xa_g, b_g, xa_u, b_u, force_triton: bool | None = None) -> torch.Tensor:
    """silu(g0 + xa_g b_g^T) * (u0 + xa_u b_u^T) for g0, u0 (N, inter), xa (N, r), b (inter, r), one dtype.

    Triton on CUDA, the reference elsewhere. The kernels read a (rank, 128) slice of each B per 16-row tile,
    so they pay for small ranks (`lora_mlp` uses them up to `kernels.lora.DEFERRED_MAX_RANK`).
    """
    _check(g0, u0, xa_g, b_g, xa_u, b_u)
    if use_triton(g0, u0, xa_g, b_g, xa_u, b_u, force=force_triton):
        return SwiGLULoRAFunction.apply(g0, u0, xa_g, b_g, xa_u, b_u)
    return swiglu_lora_reference(g0, u0, xa_g, b_g, xa_u, b_u)


def swiglu_lora_reference(g0, u0, xa_g, b_g, xa_u, b_u) -> torch.Tensor:
    g, u = _corrected(g0, xa_g, b_g), _corrected(u0, xa_u, b_u)
    return (F.silu(g) * u).to(g0.dtype)
