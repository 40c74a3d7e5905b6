"""LoRA linear layers with a hand-written backward that never computes gradients of the frozen base.

`lora_linear`, for x (N, in), base weight W (out, in), bias b (out,), adapters A (r, in), B (out, r), scale s:
    forward:   xA = x A^T                     (N, r)     saved, with x
               y  = x W^T + b + s xA B^T      (N, out)
    backward:  dyB = dy B                     (N, r)
               dx  = dy W + s dyB A           (N, in)
               dA  = s dyB^T x                (r, in)
               dB  = s dy^T xA                (out, r)
               dW  = dy^T x, db = sum_N dy    only if W / b require grad (never, for a frozen base)
With LoRA dropout the adapter reads x' = dropout(x) (passed as `x_lora`): xA = x' A^T, dA uses x', and the
adapter's share of dx, s dyB A, goes to x' (autograd carries it through the dropout back to x).

`lora_mlp` is the Llama MLP with LoRA on gate/up/down, one autograd node for the whole block:
    forward:   g = lora_linear(x, gate), u = lora_linear(x, up), h = silu(g) u, y = lora_linear(h, down)
    saved:     x, g0 = x W_g^T (+ b_g), u0 = x W_u^T and the three (N, r) products; h (N, inter), the largest
               activation, is NOT saved. g0 and u0 lack their adapter terms: the SwiGLU kernels
               (`swiglu_lora.py`) add xa_g (s_g B_g)^T and xa_u (s_u B_u)^T to each tile they read, so the
               gate and up products each write their (N, inter) output once and nothing reads it back.
    backward:  dh from the down backward; dg, du by the SwiGLU backward (du = dh silu(g),
               dg = dh u sigma (1 + g (1 - sigma))); dx = the gate and up backwards summed. The down
               adapter's dA_d = s_d (dy B_d)^T h needs h: the torch path recomputes it first. On the Triton
               path one SwiGLU backward kernel reads dh and writes dg, du and (over dh) h, and also makes
               the rank-r products dg B_g, du B_u, so no product reads dg or du back for them and h is not
               recomputed apart.
    memory:    dh and h share one buffer, and dg, du go over the saved g0, u0: three (N, inter) buffers at
               the backward's peak instead of five. The saved g0, u0 are consumed, so a second backward
               through the same graph (retain_graph) is refused.
    quantised: a dequantiser may carry `fresh` (a callable giving an own dense tensor rather than the shared
               buffer); in a recompute for the backward the gate weight is then dequantised once and held
               for that backward's dx product (one (inter, hidden) tensor, while it runs); up and down are
               dequantised into the shared buffer right before each product, as in a plain pass.

`lora_qkv` is the three attention input projections of one x as one autograd node: x is saved once, and
the backward accumulates dx = sum over q, k, v of (dy W + s dyB A) into one buffer (in-place addmm).

A layer recomputed in halves (`memory.layer_pass.LayerPass`, passed as `layer_pass`) changes three things:
- Rerun for the backward (`rerun`): the backward of `lora_linear` and `lora_mlp` never reads their output y,
  only x, the (N, r) products and (MLP) g, u. They skip the output's base product (x W^T, and the down
  projection h W_d^T: a third of the MLP's forward FLOPs; the MLP also skips silu(g) u, which its backward
  makes anyway, and takes h A_d^T from the forward) and return a zero-stride placeholder of y's shape whose
  values must not be read; the gradients are exact.
- Residual in the epilogue (`residual`, in the layer's forward, where nothing needs a gradient): the output
  comes back as residual + output. Where the residual has the output's shape and compute dtype it is
  written first with the rank-r term and the base product accumulates onto it in the GEMM's epilogue, so
  the block's x + f(x) needs no separate pass that reads both and writes the sum; a wider residual (fp32
  under bf16 autocast) is added after.
- Kept tensors (`kept`): the forward's h A_d^T, (N, r), is kept for the rerun, whose backward would
  otherwise read h once more to make it again; with `keep_gate_up` also g0 and u0 (to host memory or held
  on the device), and the rerun then runs only the rank-r products of gate and up, not their base products
  (two thirds of the MLP's forward FLOPs). Both are exact: the same tensors.

The matmuls run through torch (cuBLAS), except the rank-r products that write an (N, out) output (the
adapter term the base product accumulates onto, and dx's adapter share): on CUDA the kernel of
`rank_product.py` writes them in one pass. The SwiGLU of `lora_mlp` (with the gate/up adapter terms) runs the
Triton kernels of `swiglu_lora.py` on CUDA; the torch path keeps complete g and u (the terms in the products).
All products run in one compute dtype: the autocast dtype when autocast is on, else x's dtype (adapters
stepped as one flat buffer are read from its copy in that dtype, `adapter_cast`); adapter gradients are
returned in the adapters' own dtype. An FP8 base (a dequantiser carrying `.fp8`,
`models/fp8.py`) runs its base products in FP8 (`kernels/fp8.py`): the forward's x W^T and the backward's
dy W (`_dx`). `weight` may be a dense tensor or a callable returning one
(e.g. an NF4 dequantisation into a reused buffer, called once in the forward and once in the backward).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F

from fasttune.kernels._dispatch import use_triton
from fasttune.kernels.adapter_cast import in_dtype
from fasttune.kernels.fp8 import FP8Weight, fp8_grad_input, fp8_input, fp8_product
from fasttune.kernels.rank_product import _rank_product_fwd
from fasttune.kernels.swiglu import _swiglu_bwd, _swiglu_fwd
from fasttune.kernels.swiglu_lora import _swiglu_lora_bwd, _swiglu_lora_fwd

if TYPE_CHECKING:
    from fasttune.memory.layer_pass import LayerPass

WeightLike = torch.Tensor | Callable[[], torch.Tensor]


def _residual_rows(residual: torch.Tensor | None, shape, dt: torch.dtype) -> torch.Tensor | None:
    """The residual as (N, out) rows if it fits an output of `shape` (..., out) in the compute dtype `dt`,
    else None (a wider residual stream, e.g. fp32 under bf16 autocast, is added after the product)."""
    if residual is None or residual.shape != shape or residual.dtype != dt:
        return None
    return residual.reshape(-1, shape[-1])


def _with_residual(y: torch.Tensor, residual: torch.Tensor | None, fused: torch.Tensor | None
                   ) -> torch.Tensor:
    """The output as `layer_pass.residual` asks it: residual + y, unless the product has added it already."""
    return y if residual is None or fused is not None else residual + y


def _kept(t: torch.Tensor, shape: tuple, dt: torch.dtype, what: str) -> torch.Tensor:
    if t.shape != shape or t.dtype != dt:
        raise ValueError(f"lora_mlp: the kept {what} {tuple(t.shape)} {t.dtype} does not fit {shape} {dt}")
    return t


def _check_residual(name: str, layer_pass: LayerPass | None) -> None:
    if layer_pass is not None and layer_pass.residual is not None and torch.is_grad_enabled():
        raise RuntimeError(f"{name}: a residual is added only under torch.no_grad() (it gets no gradient)")


def _placeholder(like: torch.Tensor, shape) -> torch.Tensor:
    """A tensor of `shape` that owns one element: stands for an output nobody reads."""
    return like.new_zeros(()).expand(*shape)


class LoRAWeights(NamedTuple):
    """One adapted projection: base weight (out, in) or its dequantiser, bias, A (r, in), B (out, r), s."""

    weight: WeightLike
    bias: torch.Tensor | None
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _dense(weight: WeightLike, dtype: torch.dtype) -> torch.Tensor:
    w = weight() if callable(weight) and not isinstance(weight, torch.Tensor) else weight
    return w if w.dtype == dtype else w.to(dtype)


def _dense_or(w: torch.Tensor | None, dequant: Callable[[], torch.Tensor] | None, dtype) -> torch.Tensor:
    """The kept dense weight, or a fresh dequantisation when the base is quantised."""
    return w if w is not None else _dense(dequant, dtype)


def _weight_term(w: torch.Tensor | None, dequant, dt: torch.dtype):
    """The base operand of a dx term (`_dx`): the FP8 weight when the dequantiser carries one, else a getter
    of the kept or dequantised dense weight."""
    fp8 = getattr(dequant, "fp8", None) if w is None else None
    return fp8 if fp8 is not None else (lambda: _dense_or(w, dequant, dt))


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def _down_a(x2, adapters) -> list[torch.Tensor]:
    """x A_i^T of several adapters of one input as one product (one read of x): (N, r_i) column views."""
    if len(adapters) == 1:
        return [x2 @ adapters[0].t()]
    return list((x2 @ torch.cat(adapters, 0).t()).split([a.shape[0] for a in adapters], 1))


def _base(weight, dequant, dt):
    """The forward's base operand: the FP8 weight when the dequantiser carries one (`models/fp8.py`),
    else the dense weight in `dt` (kept, cast, or dequantised)."""
    fp8 = getattr(dequant, "fp8", None) if weight is None else None
    return fp8 if fp8 is not None else _dense(dequant if weight is None else weight, dt)


def _scaled(t: torch.Tensor, s: float) -> torch.Tensor:
    """t s, or t itself at s = 1 (lora_alpha = r): no pass over it, no launch."""
    return t if s == 1.0 else t * s


def _forward(x2, w, bias, a, b, s, xl2=None, xa=None, x_fp8=None, residual=None):
    """y = residual + x W^T + bias + s (x' A^T) B^T on 2-D operands (x' = x when `xl2` is None, no residual
    when it is None); returns (y, xA).

    The residual, rank-r term and bias are written first and the base product accumulates onto them in its
    GEMM's epilogue, where reading y is hidden under the arithmetic; adding either afterwards costs a pass
    over y. `xa`: x' A^T when the caller has it already (`_down_a`). `w` may be an FP8Weight: the base
    product then runs in FP8 (`x_fp8`: x already quantised) and the other terms are added after it.
    """
    if xa is None:
        xa = (x2 if xl2 is None else xl2) @ a.t()  # (N, r)
    if isinstance(w, FP8Weight):
        y = fp8_product(x2, w, x2.dtype, x_fp8).addmm_(xa, b.t(), alpha=s)  # (N, out)
        y = y if bias is None else y.add_(bias)
        return (y if residual is None else y.add_(residual)), xa
    bs = _scaled(b.t(), s)  # (r, out), scaled here rather than scaling the (N, out) product
    first = residual if bias is None else (bias if residual is None else residual + bias)
    y = _rank_r(xa, bs, first)  # (N, out)
    y.addmm_(x2, w.t())
    return y, xa


def _rank_r(a, b, c=None, out=None) -> torch.Tensor:
    """c + a b for a (N, r), b (r, M) into `out` (new when None): one pass over the output in the Triton
    kernel of `rank_product.py` on CUDA (cuBLAS is slow at these shapes, and addmm copies c first); torch
    elsewhere and for a bias vector c (broadcast over the rows)."""
    if (c is None or c.dim() == 2) and use_triton(a, b, c):
        return _rank_product_fwd(a, b, c, out)
    return torch.mm(a, b, out=out) if c is None else torch.addmm(c, a, b, out=out)


def _grad_product(a: torch.Tensor, b: torch.Tensor, s: float, dtype: torch.dtype) -> torch.Tensor:
    """s (a b) as an adapter's gradient in `dtype`. fp32 adapters under 16-bit compute on CUDA: the product
    accumulates in fp32 and writes fp32 itself (`torch.mm`'s out_dtype), unrounded, with no cast after it;
    the scaling pass is skipped at s = 1 (lora_alpha = r). Elsewhere the product in a's dtype, then cast."""
    if a.is_cuda and dtype == torch.float32 and a.dtype in (torch.bfloat16, torch.float16):
        p = torch.mm(a, b, out_dtype=dtype)
    else:
        p = a @ b
    if s != 1.0:
        p = p.mul_(s)
    return p.to(dtype)


def _one_dtype(*dtypes: torch.dtype) -> torch.dtype | None:
    """The dtype the A parameters share, for `_shared_da` to write; None when they differ (the compute dtype,
    then a cast each)."""
    return dtypes[0] if len(set(dtypes)) == 1 else None


def _grads(dy2, x2, a, b, s, xl2, xa, needs, dyb=None, dtypes=(None, None)):
    """Per-projection gradients of `_forward` other than dx: (dyB, dW, dbias, dA, dB, dx'), each only if
    flagged in `needs` = (W, bias, A, B, x'). dx of one or several projections of one x: `_dx`.
    `dyb`: dy B when the caller has it already (the SwiGLU backward kernel makes it for gate and up).
    `dtypes`: of the A and B parameters, which dA and dB come in (None: the compute dtype)."""
    want_w, want_bias, want_a, want_b, want_xl = needs
    dyb = dy2 @ b if dyb is None else dyb  # (N, r)
    dt_a, dt_b = (dt or dy2.dtype for dt in dtypes)
    da = _grad_product(dyb.t(), x2 if xl2 is None else xl2, s, dt_a) if want_a else None  # (r, in)
    db = _grad_product(dy2.t(), xa, s, dt_b) if want_b else None  # (out, r)
    dw = dy2.t() @ x2 if want_w else None  # (out, in)
    dbias = dy2.sum(0) if want_bias else None
    dxl = (dyb @ a).mul_(s) if want_xl and xl2 is not None else None  # (N, in)
    return dyb, dw, dbias, da, db, dxl


def _shared_da(x2, dybs: list[torch.Tensor | None], scalings, dtype=None) -> list[torch.Tensor | None]:
    """dA_i = s_i (dy_i B_i)^T x for several projections of one x as one product (one read of x, which is
    (N, in) against their (N, r) operands); None where dy_i B_i is None (that A needs no gradient).
    `dtype`: of the A parameters, which the product writes (`_grad_product`; None: the compute dtype)."""
    live = [(i, _scaled(d, s)) for i, (d, s) in enumerate(zip(dybs, scalings)) if d is not None]
    out: list[torch.Tensor | None] = [None] * len(dybs)
    if live:
        cat = torch.cat([d for _, d in live], 1).t()
        parts = _grad_product(cat, x2, 1.0, dtype or x2.dtype).split([d.shape[1] for _, d in live], 0)
        for (i, _), da in zip(live, parts):
            out[i] = da  # (r_i, in)
    return out


def _dx(terms, out: torch.Tensor | None = None) -> torch.Tensor:
    """dx = sum over projections i of dy_i W_i + s_i (dy_i B_i) A_i, for terms (dy_i, W_i getter, dyB_i, A_i,
    s_i); dyB_i None leaves the adapter's share out (it goes to a dropout input instead).

    The adapter shares of all projections are one (N, sum r) x (sum r, in) product that writes dx once; each
    base product then accumulates in its GEMM's epilogue. A getter is called right before its product
    (dequantisers may share one buffer). `out`: a buffer for dx, e.g. a dead activation of the same shape.
    A term may carry an FP8Weight instead of a getter (`_weight_term`): its dy_i W_i runs in FP8 first and
    writes an output of its own (`torch._scaled_mm` cannot accumulate onto a given one); the first such
    output becomes dx, and the adapter shares then accumulate onto it in one pass that reads and writes dx.
    """
    dx = None
    for dy2, w, *_ in terms:
        if isinstance(w, FP8Weight):
            p = fp8_grad_input(dy2, w, dy2.dtype)  # (N, in)
            dx = p if dx is None else dx.add_(p)
    rest = [t for t in terms if not isinstance(t[1], FP8Weight)]
    adapters = [(dyb, _scaled(a, s)) for _, _, dyb, a, s in terms if dyb is not None]
    if adapters:
        dx = _rank_r(torch.cat([d for d, _ in adapters], 1), torch.cat([m for _, m in adapters], 0), c=dx,
                     out=out if dx is None else dx)
    elif dx is None:
        dx = torch.mm(rest[0][0], rest[0][1](), out=out)
        rest = rest[1:]
    for dy2, get_w, *_ in rest:
        dx.addmm_(dy2, get_w())
    return dx


class LoRALinearFunction(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, x_lora, dequant, layer_pass):
        dt = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dt)  # (N, in)
        xl2 = None if x_lora is None else x_lora.reshape(-1, shape[-1]).to(dt)  # (N, in)
        a, b = in_dtype(lora_A, dt), in_dtype(lora_B, dt)
        skip = layer_pass is not None and layer_pass.rerun
        residual = None if layer_pass is None else layer_pass.residual
        fused = None
        if skip:
            xa = (x2 if xl2 is None else xl2) @ a.t()  # (N, r); the output's products are skipped
            w = weight.to(dt) if weight is not None and weight.dtype != dt else weight
            y = _placeholder(x2, (x2.shape[0], lora_B.shape[0]))
        else:
            w = _base(weight, dequant, dt)
            fused = _residual_rows(residual, (*shape[:-1], lora_B.shape[0]), dt)
            y, xa = _forward(x2, w, _cast(bias, dt), a, b, scaling, xl2, residual=fused)
        ctx.dequant, ctx.scaling = dequant, scaling
        ctx.dtypes = [None if t is None else t.dtype for t in (x, weight, bias, lora_A, lora_B, x_lora)]
        # x is needed only for dW (frozen: never) and for dA when there is no dropout (x' = x).
        keep_x = ctx.needs_input_grad[1] or x_lora is None
        ctx.save_for_backward(x2 if keep_x else None, xl2, xa, None if weight is None else w, a, b)
        if skip:
            return _placeholder(x2, (*shape[:-1], y.shape[-1]))
        return _with_residual(y.view(*shape[:-1], y.shape[-1]), residual, fused)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x2, xl2, xa, w, a, b = ctx.saved_tensors
        fp8 = getattr(ctx.dequant, "fp8", None) if w is None else None  # dy W in FP8 (`_dx`)
        if w is None and fp8 is None:  # a quantised base: dequantise again rather than keep the dense copy
            w = _dense(ctx.dequant, a.dtype)
        dy2 = dy.reshape(-1, dy.shape[-1]).to(a.dtype)  # (N, out)
        n = ctx.needs_input_grad
        dyb, *grads = _grads(dy2, x2, a, b, ctx.scaling, xl2, xa, (n[1], n[2], n[3], n[4], n[6]),
                             dtypes=ctx.dtypes[3:5])
        w_term = fp8 if fp8 is not None else (lambda: w)
        dx = _dx([(dy2, w_term, dyb if xl2 is None else None, a, ctx.scaling)]) if n[0] else None
        dx, dw, dbias, da, db, dxl = (_cast(g, dt) for g, dt in zip((dx, *grads), ctx.dtypes))
        lead = dy.shape[:-1]
        dx = None if dx is None else dx.view(*lead, dx.shape[-1])
        dxl = None if dxl is None else dxl.view(*lead, dxl.shape[-1])
        return dx, dw, dbias, da, db, None, dxl, None, None


def _check_linear(name: str, in_features: int, p: LoRAWeights) -> None:
    if isinstance(p.weight, torch.Tensor) and (p.weight.dim() != 2 or p.weight.shape[1] != in_features):
        raise ValueError(f"{name}: weight {tuple(p.weight.shape)} does not take inputs of {in_features}")
    r = p.lora_A.shape[0]
    out = p.weight.shape[0] if isinstance(p.weight, torch.Tensor) else p.lora_B.shape[0]
    if p.lora_A.shape[1] != in_features or p.lora_B.shape != (out, r):
        raise ValueError(f"{name}: lora_A {tuple(p.lora_A.shape)} and lora_B {tuple(p.lora_B.shape)} do not "
                         f"fit inputs of {in_features} and outputs of {out}")


def lora_linear(
    x: torch.Tensor,
    weight: WeightLike,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
    layer_pass: LayerPass | None = None,
) -> torch.Tensor:
    """x W^T + b + scaling (x' A^T) B^T with x' = `x_lora` (dropout(x)) or x; hand-written backward.

    x: (..., in); weight: (out, in) tensor, or a callable returning it (a 4-bit base's dequantiser);
    bias: (out,) or None; lora_A: (r, in); lora_B: (out, r). Pure torch, so it runs on any device.
    `layer_pass`: a layer recomputed in halves (module docstring): its rerun, or its residual.
    """
    _check_linear("lora_linear", x.shape[-1], LoRAWeights(weight, bias, lora_A, lora_B, scaling))
    _check_residual("lora_linear", layer_pass)
    if isinstance(weight, torch.Tensor):
        return LoRALinearFunction.apply(x, weight, bias, lora_A, lora_B, scaling, x_lora, None, layer_pass)
    return LoRALinearFunction.apply(x, None, bias, lora_A, lora_B, scaling, x_lora, weight, layer_pass)


def lora_linear_reference(
    x: torch.Tensor,
    weight: WeightLike,
    bias: torch.Tensor | None,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    x_lora: torch.Tensor | None = None,
) -> torch.Tensor:
    dt = x.dtype
    xl = x if x_lora is None else x_lora
    lora = F.linear(F.linear(xl, lora_A.to(dt)), lora_B.to(dt))
    return F.linear(x, _dense(weight, dt), _cast(bias, dt)) + scaling * lora


def _base_only(x2, w, bias, x_fp8=None) -> torch.Tensor:
    """x W^T + bias without the adapter term (`lora_mlp`'s gate and up: the SwiGLU kernels add it)."""
    if isinstance(w, FP8Weight):
        y = fp8_product(x2, w, x2.dtype, x_fp8)
        return y if bias is None else y.add_(bias)
    return torch.mm(x2, w.t()) if bias is None else torch.addmm(bias, x2, w.t())


# Gate/up adapters of rank <= this are added in the Triton SwiGLU kernels (module docstring): the kernels read
# a (rank, 128) slice of B per 16-row tile, so their cost grows with the rank.
DEFERRED_MAX_RANK = 16


def _gate_up_product(x2, w, bias, a, b, s, xa, x_fp8, defer: bool) -> torch.Tensor:
    """The gate or up output: without its adapter term if `defer` (the SwiGLU kernel adds it), else whole."""
    if defer:
        return _base_only(x2, w, bias, x_fp8)
    return _forward(x2, w, bias, a, b, s, xa=xa, x_fp8=x_fp8)[0]


def _silu_mul(g, u, lora_terms, triton: bool) -> torch.Tensor:
    """h = silu(g) u. With lora_terms = (xa_g, b_g, xa_u, b_u) (Triton only), g and u are g0, u0 and the
    kernel adds xa_g b_g^T and xa_u b_u^T first; with None they are complete."""
    if lora_terms is not None:
        return _swiglu_lora_fwd(g, u, *lora_terms)
    return _swiglu_fwd(g, u) if triton else F.silu(g) * u


def _silu_mul_grad(dh, g, u, triton: bool):
    """(dg, du) of h = silu(g) u for complete g, u, written over them (the torch branch: the kernel's fp32
    formula). With deferred adapter terms the backward calls the SwiGLU-LoRA kernel instead."""
    if triton:
        return _swiglu_bwd(dh, g, u, inplace=True)
    gf, sig, dhf = g.float(), torch.sigmoid(g.float()), dh.float()
    du = dhf * gf * sig
    dg = dhf * u.float() * sig * (1 + gf * (1 - sig))
    return g.copy_(dg), u.copy_(du)


class LoRAMLPFunction(torch.autograd.Function):
    """down(silu(gate(x)) * up(x)) with LoRA on all three; tensor inputs: x, then (W, bias, A, B) x 3."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, wg, bg, ag, bbg, wu, bu, au, bbu, wd, bd, ad, bbd, scalings, dequants, triton,
                layer_pass):
        dt = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dt)  # (N, hidden)
        # Dense weights are cast once and kept; a dequantiser is called right before its product, because
        # dequantisers may share one output buffer (nf4_buffer) across projections.
        dense = [None if w is None else _dense(w, dt) for w in (wg, wu, wd)]
        lora = [(in_dtype(a, dt), in_dtype(b, dt)) for a, b in ((ag, bbg), (au, bbu), (ad, bbd))]
        sg, su, sd = scalings
        rerun = layer_pass is not None and layer_pass.rerun
        kept = None if layer_pass is None else layer_pass.kept
        n, inter = x2.shape[0], lora[0][1].shape[0]
        given = kept.gate_up if rerun else None
        if given is not None:
            given = tuple(_kept(t, (n, inter), dt, "gate/up") for t in given)
        if given is None and rerun and dense[0] is None and hasattr(dequants[0], "fresh"):
            # A rerun whose backward comes next: the quantised gate weight is dequantised into a tensor of
            # its own and saved, so the backward's dx product uses it instead of dequantising again. Up is
            # not: at the backward's peak (dh, with down's weight in the shared buffer) one held dense copy
            # costs (inter, hidden) less than two, for one more dequantisation after it.
            dense[0] = _dense(dequants[0].fresh, dt)
        xag, xau = _down_a(x2, [lora[0][0], lora[1][0]])
        # g0, u0 without their adapter terms, for the Triton SwiGLU to add (in torch it would be extra work)
        defer = triton and max(ag.shape[0], au.shape[0]) <= DEFERRED_MAX_RANK
        if given is not None:  # kept from the first forward: only the rank-r products the backward reads
            g, u = given
        else:
            xq = fp8_input(x2, *(getattr(dq, "fp8", None) for dq in dequants[:2]))  # once, for FP8 bases
            g, u = (_gate_up_product(x2, _base(dense[i], dequants[i], dt), _cast(b, dt), *lora[i], s, xa, xq,
                                     defer)  # (N, inter); each dequantised right before its product
                    for i, b, s, xa in ((0, bg, sg, xag), (1, bu, su, xau)))
        if kept is not None and not rerun and layer_pass.keep_gate_up:
            kept.gate_up = (g, u)
        residual = fused = None
        if rerun:  # nothing reads the down output: h A_d^T is the forward's, or left to the backward
            had = kept.down_a
            if had is not None:
                had = _kept(had, (n, lora[2][0].shape[0]), dt, "h A_d^T")
            y = _placeholder(x2, (n, lora[2][1].shape[0]))
        else:
            terms = (xag, _scaled(lora[0][1], sg), xau, _scaled(lora[1][1], su)) if defer else None
            h = _silu_mul(g, u, terms, triton)  # (N, inter)
            residual = None if layer_pass is None else layer_pass.residual
            fused = _residual_rows(residual, (*shape[:-1], lora[2][1].shape[0]), dt)
            y, had = _forward(h, _base(dense[2], dequants[2], dt), _cast(bd, dt), *lora[2], sd,
                              residual=fused)  # (N, H)
            del h  # recomputed in the backward: the largest activation of the block is never kept
            if kept is not None:
                kept.down_a = had
        ctx.scalings, ctx.dequants, ctx.triton, ctx.consumed = scalings, dequants, triton, False
        ctx.defer = defer
        ctx.dtypes = [None if t is None else t.dtype
                      for t in (x, wg, bg, ag, bbg, wu, bu, au, bbu, wd, bd, ad, bbd)]
        ctx.save_for_backward(x2, g, u, xag, xau, had, *dense, *lora[0], *lora[1], *lora[2])
        if rerun:
            return _placeholder(x2, (*shape[:-1], y.shape[-1]))
        return _with_residual(y.view(*shape[:-1], y.shape[-1]), residual, fused)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        if ctx.consumed:
            raise RuntimeError("lora_mlp: the backward overwrites its saved activations and runs once per "
                               "forward (retain_graph=True is not supported)")
        ctx.consumed = True
        x2, g, u, xag, xau, had, wg, wu, wd, ag, bbg, au, bbu, ad, bbd = ctx.saved_tensors
        dt = x2.dtype
        dqg, dqu, dqd = ctx.dequants
        sg, su, sd = ctx.scalings
        n = ctx.needs_input_grad
        dy2 = dy.reshape(-1, dy.shape[-1]).to(dt)  # (N, hidden)
        terms = (xag, _scaled(bbg, sg), xau, _scaled(bbu, su)) if ctx.defer else None  # what g0, u0 lack
        flags = (n[9], n[10], n[11], n[12], False)
        # the kernel's dg B_g, du B_u come from its terms s B (s = 0: the adapter's gradients are zero)
        inv = tuple(1.0 / s if s else 0.0 for s in (sg, su))
        if terms is not None:
            # The kernel makes dg, du over g, u and writes h over dh (dh is read first): h is not recomputed
            # apart for dA_d = s_d (dy B_d)^T h.
            dybd = dy2 @ bbd  # (N, r)
            dh = _dx([(dy2, _weight_term(wd, dqd, dt), dybd, ad, sd)])  # (N, inter)
            dg, du, dybg, dybu, h = _swiglu_lora_bwd(dh, g, u, *terms, inplace=True, want_db=True,
                                                     db_scales=inv, want_h=True)
            del dh
            had = h @ ad.t() if had is None else had  # (N, r); None: a recompute for this backward skipped it
            _, dwd, dbd, dad, dbbd, _ = _grads(dy2, h, ad, bbd, sd, None, had, flags, dybd, ctx.dtypes[11:13])
            del h
        else:
            h = _silu_mul(g, u, None, ctx.triton)  # (N, inter), recomputed
            had = h @ ad.t() if had is None else had
            dybd, dwd, dbd, dad, dbbd, _ = _grads(dy2, h, ad, bbd, sd, None, had, flags,
                                                  dtypes=ctx.dtypes[11:13])
            # dh goes into h's buffer: every read of h is above.
            dh = _dx([(dy2, _weight_term(wd, dqd, dt), dybd, ad, sd)], out=h)
            del h
            dg, du = _silu_mul_grad(dh, g, u, ctx.triton)  # over g and u
            dybg = dybu = None  # made by _grads below
            del dh
        dybg, dwg, dbg, _, dbbg, _ = _grads(dg, x2, ag, bbg, sg, None, xag, (n[1], n[2], False, n[4], False),
                                            dybg, ctx.dtypes[3:5])
        dybu, dwu, dbu, _, dbbu, _ = _grads(du, x2, au, bbu, su, None, xau, (n[5], n[6], False, n[8], False),
                                            dybu, ctx.dtypes[7:9])
        dag, dau = _shared_da(x2, [dybg if n[3] else None, dybu if n[7] else None], (sg, su),
                              _one_dtype(ctx.dtypes[3], ctx.dtypes[7]))
        dx = _dx([(dg, _weight_term(wg, dqg, dt), dybg, ag, sg),
                  (du, _weight_term(wu, dqu, dt), dybu, au, su)]) if n[0] else None
        grads = (dx, dwg, dbg, dag, dbbg, dwu, dbu, dau, dbbu, dwd, dbd, dad, dbbd)
        grads = [_cast(gr, t) for gr, t in zip(grads, ctx.dtypes)]
        if grads[0] is not None:
            grads[0] = grads[0].view(dy.shape)
        return (*grads, None, None, None, None)


def lora_mlp(
    x: torch.Tensor,
    gate: LoRAWeights,
    up: LoRAWeights,
    down: LoRAWeights,
    force_triton: bool | None = None,
    layer_pass: LayerPass | None = None,
) -> torch.Tensor:
    """The Llama MLP down(silu(gate(x)) * up(x)), each projection a LoRA linear, as one autograd node.

    Saves x, gate(x), up(x) and the rank-r products; recomputes silu(g) u in the backward. The SwiGLU runs
    the Triton kernel on CUDA (or when forced), torch elsewhere. LoRA dropout is not supported here: with
    dropout on, call `lora_linear` per projection. `layer_pass`: a layer recomputed in halves (module
    docstring): its residual and kept tensors in the forward, its rerun.
    """
    _check_linear("lora_mlp gate", x.shape[-1], gate)
    _check_linear("lora_mlp up", x.shape[-1], up)
    _check_linear("lora_mlp down", gate.lora_B.shape[0], down)
    _check_residual("lora_mlp", layer_pass)
    triton = use_triton(x, force=force_triton)
    args: list = [x]
    dequants = []
    for p in (gate, up, down):
        is_tensor = isinstance(p.weight, torch.Tensor)
        args += [p.weight if is_tensor else None, p.bias, p.lora_A, p.lora_B]
        dequants.append(None if is_tensor else p.weight)
    scalings = (gate.scaling, up.scaling, down.scaling)
    return LoRAMLPFunction.apply(*args, scalings, tuple(dequants), triton, layer_pass)


def lora_mlp_reference(
    x: torch.Tensor, gate: LoRAWeights, up: LoRAWeights, down: LoRAWeights
) -> torch.Tensor:
    g = lora_linear_reference(x, *gate)
    u = lora_linear_reference(x, *up)
    return lora_linear_reference(F.silu(g) * u, *down)


class LoRAQKVFunction(torch.autograd.Function):
    """(q, k, v) = three LoRA linears of one x as one autograd node; tensor inputs: x, (W, bias, A, B) x 3."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, wq, bq, aq, bbq, wk, bk, ak, bbk, wv, bv, av, bbv, scalings, dequants, outputs):
        dt = _compute_dtype(x)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(dt)  # (N, hidden)
        dense = [None if w is None else _dense(w, dt) for w in (wq, wk, wv)]
        lora = [(in_dtype(a, dt), in_dtype(b, dt)) for a, b in ((aq, bbq), (ak, bbk), (av, bbv))]
        xas = _down_a(x2, [a for a, _ in lora])  # (N, r) each, one read of x
        if outputs:
            outs = []
            xq = fp8_input(x2, *(getattr(dq, "fp8", None) for dq in dequants))  # x in FP8 once, for FP8 bases
            for w, dq, bias, (a, b), s, xa in zip(dense, dequants, (bq, bk, bv), lora, scalings, xas):
                y, _ = _forward(x2, _base(w, dq, dt), _cast(bias, dt), a, b, s, xa=xa, x_fp8=xq)  # (N, out)
                outs.append(y.view(*shape[:-1], y.shape[-1]))
        else:  # a rerun whose backward has q, k, v kept: only the rank-r products, for dB
            outs = [_placeholder(x2, (*shape[:-1], b.shape[0])) for _, b in lora]
        ctx.scalings, ctx.dequants = scalings, dequants
        ctx.dtypes = [None if t is None else t.dtype
                      for t in (x, wq, bq, aq, bbq, wk, bk, ak, bbk, wv, bv, av, bbv)]
        ctx.save_for_backward(x2, *xas, *dense, *lora[0], *lora[1], *lora[2])
        return tuple(outs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dq, dk, dv):
        x2, *rest = ctx.saved_tensors
        xas, dense, ab = rest[:3], rest[3:6], rest[6:]
        n = ctx.needs_input_grad
        grads, terms = [], []
        for i, dy in enumerate((dq, dk, dv)):  # an unused output's gradient arrives as zeros
            dy2 = dy.reshape(-1, dy.shape[-1]).to(x2.dtype)  # (N, out_i)
            a, b, s = ab[2 * i], ab[2 * i + 1], ctx.scalings[i]
            flags = (n[1 + 4 * i], n[2 + 4 * i], False, n[4 + 4 * i], False)  # dA: below, one read of x
            dyb, dw, dbias, _, db, _ = _grads(dy2, x2, a, b, s, None, xas[i], flags,
                                              dtypes=ctx.dtypes[3 + 4 * i:5 + 4 * i])
            grads += [dw, dbias, None, db]
            terms.append((dy2, _weight_term(dense[i], ctx.dequants[i], x2.dtype), dyb, a, s))
        das = _shared_da(x2, [t[2] if n[3 + 4 * i] else None for i, t in enumerate(terms)], ctx.scalings,
                         _one_dtype(*ctx.dtypes[3::4]))
        grads[2::4] = das
        dx = _dx(terms) if n[0] else None
        grads = [_cast(g, t) for g, t in zip([dx, *grads], ctx.dtypes)]
        if grads[0] is not None:
            grads[0] = grads[0].view(*dq.shape[:-1], grads[0].shape[-1])
        return (*grads, None, None, None)


def lora_qkv(
    x: torch.Tensor, q: LoRAWeights, k: LoRAWeights, v: LoRAWeights, outputs: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) projections of one x, each a LoRA linear, as one autograd node (one saved x, one dx buffer).

    Pure torch, so it runs on any device. LoRA dropout is not supported here (use `lora_linear`).
    outputs=False (a rerun whose attention backward reads kept q, k, v: `memory/kept_attention.py`): the
    base products are skipped and the outputs are placeholders whose values must not be read; the backward
    is the same.
    """
    args: list = [x]
    dequants = []
    for name, p in (("q", q), ("k", k), ("v", v)):
        _check_linear(f"lora_qkv {name}", x.shape[-1], p)
        is_tensor = isinstance(p.weight, torch.Tensor)
        args += [p.weight if is_tensor else None, p.bias, p.lora_A, p.lora_B]
        dequants.append(None if is_tensor else p.weight)
    return LoRAQKVFunction.apply(*args, (q.scaling, k.scaling, v.scaling), tuple(dequants), outputs)


def lora_qkv_reference(
    x: torch.Tensor, q: LoRAWeights, k: LoRAWeights, v: LoRAWeights
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return lora_linear_reference(x, *q), lora_linear_reference(x, *k), lora_linear_reference(x, *v)
