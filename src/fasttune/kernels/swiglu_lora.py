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
    d xa_g = dg b_g,  d b_g = dg^T xa_g        (and the same for up)
The backward kernel can also return d xa_g and d xa_u (`want_db`): each program walks a strip of 8 column
tiles and adds its tiles' dg b_g, du b_u on the tensor cores into (rows, r) partial sums, one slot per
strip, which are summed after it (deterministic, no atomics). A product over dg, du would read two
(N, inter) tensors again for them.

The backward kernel can also write h = silu(g) u over dh once dh is read (`want_h`), which the down
adapter's gradient s_d (dy B_d)^T h in `lora_mlp`'s backward needs; without it that backward would run the
forward kernel again for h.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.kernels._dispatch import cdiv, interpreting, jit, next_pow2, tl, to_dtype, use_triton

# Tile shapes tuned on an H100 at the Llama-3.1-8B MLP (bf16, r = 16).
_BLOCK_N, _BLOCK_I = 16, 128  # rows x intermediate columns per program
# With the (N, r) products (backward), a program walks a strip of _PART_TILES tiles; for 16-bit inputs they
# are 64 rows tall (4 warps, 3 pipeline stages), so that each strip's (rows, r) sums cover more rows; fp32
# inputs keep 16-row tiles.
_PART_ROWS, _PART_TILES = 64, 8
# Writing h as well (want_h) keeps more of each tile live: 64 columns a tile there, 8 a strip.
_H_COLS = 64


def _tall(dtype: torch.dtype) -> bool:
    """Whether a launch that makes (N, r) products uses the tall (_PART_ROWS) tiles."""
    return dtype in (torch.bfloat16, torch.float16)


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
def _times_b(d, bt_ptr, cols, col_ok, rank, s_br, BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr):
    """(rows, BLOCK_R) = d b[cols] for a (rows, BLOCK_I) tile d, already rounded to the stored dtype, and
    bt = b^T (r, inter) with unit column stride: one tile's share of the (N, r) product d b."""
    r = tl.arange(0, BLOCK_R)
    bt = tl.load(bt_ptr + r[:, None] * s_br + cols[None, :], mask=(r < rank)[:, None] & col_ok[None, :],
                 other=0.0)  # (BLOCK_R, BLOCK_I)
    if DOT_FP32:
        return tl.dot(d.to(tl.float32), tl.trans(bt.to(tl.float32)), input_precision="ieee")
    return tl.dot(d, tl.trans(bt))


@jit
def _store_partial(p_ptr, acc, rows, row_ok, rank, s_ps, s_pn, BLOCK_R: tl.constexpr):
    """This strip's (rows, r) partial sums into its slot of a (strips, N, r) fp32 buffer."""
    r = tl.arange(0, BLOCK_R)
    tl.store(p_ptr + tl.program_id(1) * s_ps + rows[:, None] * s_pn + r[None, :], acc,
             mask=row_ok[:, None] & (r < rank)[None, :])


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
                            pg_ptr, pu_ptr, n_rows, n_cols, rank, s_dhn, s_gn, s_un,
                            s_xgn, s_xgr, s_bgr, s_xun, s_xur, s_bur, s_dgn, s_dun, s_ps, s_pn,
                            BLOCK_N: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
                            DOT_FP32: tl.constexpr, TILES: tl.constexpr, WANT_DB: tl.constexpr,
                            WANT_H: tl.constexpr):
    # A strip of TILES (BLOCK_N, BLOCK_I) tiles per program; with WANT_DB also the strip's share of dg b_g
    # and du b_u, (BLOCK_N, r) each, written to this strip's slot of the partial-sum buffers. WANT_H: h is
    # written over dh's tile.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n_rows
    acc_g = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
    for t in range(TILES):
        cols = (tl.program_id(1) * TILES + t) * BLOCK_I + tl.arange(0, BLOCK_I)
        col_ok = cols < n_cols
        mask = row_ok[:, None] & col_ok[None, :]
        g, u = _load_gate_up(g_ptr, u_ptr, xg_ptr, bg_ptr, xu_ptr, bu_ptr, rows, cols, row_ok, col_ok, rank,
                             s_gn, s_un, s_xgn, s_xgr, s_bgr, s_xun, s_xur, s_bur, BLOCK_R, DOT_FP32)
        dh = tl.load(dh_ptr + rows[:, None] * s_dhn + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        sig = tl.sigmoid(g)
        if WANT_H:  # this program alone reads this dh tile, and has read it
            tl.store(dh_ptr + rows[:, None] * s_dhn + cols[None, :],
                     to_dtype(g * sig * u, dh_ptr.dtype.element_ty), mask=mask)
        du = to_dtype(dh * g * sig, du_ptr.dtype.element_ty)
        dg = to_dtype(dh * u * sig * (1.0 + g * (1.0 - sig)), dg_ptr.dtype.element_ty)
        tl.store(du_ptr + rows[:, None] * s_dun + cols[None, :], du, mask=mask)
        tl.store(dg_ptr + rows[:, None] * s_dgn + cols[None, :], dg, mask=mask)
        if WANT_DB:  # the stored (rounded) values, as a product reading dg, du back would see them
            acc_g += _times_b(dg, bg_ptr, cols, col_ok, rank, s_bgr, BLOCK_R, DOT_FP32)
            acc_u += _times_b(du, bu_ptr, cols, col_ok, rank, s_bur, BLOCK_R, DOT_FP32)
    if WANT_DB:
        _store_partial(pg_ptr, acc_g, rows, row_ok, rank, s_ps, s_pn, BLOCK_R)
        _store_partial(pu_ptr, acc_u, rows, row_ok, rank, s_ps, s_pn, BLOCK_R)


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


def _cols(tall: bool, want_h: bool) -> int:
    return _H_COLS if tall and want_h else _BLOCK_I


def _blocks(rank: int, dtype: torch.dtype, parts: bool = False, want_h: bool = False) -> dict:
    """Launch parameters; `parts`: for the kernels that also make (N, r) products (strip-walking)."""
    if parts and _tall(dtype):
        return dict(BLOCK_N=_PART_ROWS, BLOCK_I=_cols(True, want_h), BLOCK_R=max(16, next_pow2(rank)),
                    DOT_FP32=dtype == torch.float32 or interpreting(), num_warps=4, num_stages=3)
    return dict(BLOCK_N=_BLOCK_N, BLOCK_I=_BLOCK_I, BLOCK_R=max(16, next_pow2(rank)),
                DOT_FP32=dtype == torch.float32 or interpreting(), num_warps=4)


def _lora_operands(xa_g, b_g, xa_u, b_u) -> list:
    """Kernel arguments: each xa with its two strides, each b transposed to (r, inter) with its row stride
    (a rank index's row is then read coalesced; b is small enough to copy per call)."""
    bt_g, bt_u = b_g.t().contiguous(), b_u.t().contiguous()
    return [xa_g, bt_g, xa_u, bt_u], [*xa_g.stride(), bt_g.stride(0), *xa_u.stride(), bt_u.stride(0)]


def _strips(n: int, inter: int, tiles: int, dtype: torch.dtype, want_h: bool = False) -> tuple[int, int]:
    """The grid of a launch: row blocks, strips of `tiles` column tiles (one tile: the plain kernels)."""
    tall = tiles > 1 and _tall(dtype)
    return cdiv(n, _PART_ROWS if tall else _BLOCK_N), cdiv(cdiv(inter, _cols(tall, want_h)), tiles)


def _swiglu_lora_fwd(g0, u0, xa_g, b_g, xa_u, b_u) -> torch.Tensor:
    """h (N, inter) from the adapter-free gate/up outputs and their adapter operands (module docstring)."""
    _check(g0, u0, xa_g, b_g, xa_u, b_u)
    n, inter = g0.shape
    h = torch.empty((n, inter), dtype=g0.dtype, device=g0.device)
    if h.numel():
        ops, strides = _lora_operands(xa_g, b_g, xa_u, b_u)
        _swiglu_lora_fwd_kernel[_strips(n, inter, 1, g0.dtype)](
            g0, u0, *ops, h, n, inter, xa_g.shape[1], g0.stride(0), u0.stride(0), *strides, h.stride(0),
            **_blocks(xa_g.shape[1], g0.dtype))
    return h


def _swiglu_lora_bwd(dh, g0, u0, xa_g, b_g, xa_u, b_u, inplace: bool = False, want_db: bool = False,
                     db_scales: tuple[float, float] = (1.0, 1.0), want_h: bool = False):
    """(dg, du), the gradients of the corrected g and u (= of g0 and u0); `inplace` writes them over g0, u0
    (each element is read before it is written, and no other program reads it). `want_db`: also return
    c_g dg b_g and c_u du b_u for (c_g, c_u) = `db_scales`, (N, r) in g0's dtype (with c = 1: d xa_g, d xa_u),
    summed from the kernel's per-strip partials in fp32, so that nothing reads dg, du back for them.
    `want_h`: h = silu(g) u is written over dh and returned last (module docstring)."""
    _check(g0, u0, xa_g, b_g, xa_u, b_u, dh)
    n, inter = g0.shape
    r = xa_g.shape[1]
    dg, du = (g0, u0) if inplace else (torch.empty_like(g0), torch.empty_like(u0))
    tiles = _PART_TILES if want_db else 1
    grid = _strips(n, inter, tiles, g0.dtype, want_h)
    # every (strip, row, rank) slot is written by the launch: no zeroing
    parts = torch.empty((2, grid[1], n, r), dtype=torch.float32, device=g0.device) if want_db else None
    if dg.numel():
        ops, strides = _lora_operands(xa_g, b_g, xa_u, b_u)
        pg, pu = (parts[0], parts[1]) if want_db else (dg, du)  # unused without want_db
        _swiglu_lora_bwd_kernel[grid](
            dh, g0, u0, *ops, dg, du, pg, pu, n, inter, r, dh.stride(0), g0.stride(0),
            u0.stride(0), *strides, dg.stride(0), du.stride(0), n * r, r,
            **_blocks(r, g0.dtype, want_db, want_h), TILES=tiles, WANT_DB=want_db, WANT_H=want_h)
    out = (dg, du)
    if want_db:
        sums = parts.sum(1)  # (2, N, r) fp32
        out += (sums[0].mul_(db_scales[0]).to(g0.dtype), sums[1].mul_(db_scales[1]).to(g0.dtype))
    return out + (dh,) if want_h else out


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
        dg, du, dxa_g, dxa_u = _swiglu_lora_bwd(dh.contiguous(), g0, u0, xa_g, b_g, xa_u, b_u, want_db=True)
        return dg, du, dxa_g, dg.t() @ xa_g, dxa_u, du.t() @ xa_u


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
