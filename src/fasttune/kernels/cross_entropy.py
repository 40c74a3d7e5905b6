"""Linear + cross-entropy over the vocabulary in chunks of tokens, so the (N, V) logits never exist whole.

Forward, for hidden states h (N, H), output weight W (V, H) and targets y (N,), -100 ignored:
    z = h W^T                      (per chunk of tokens)
    loss_sum = sum_i [ logsumexp(z_i) - z_i[y_i] ]   over i with y_i != -100
Backward, with g = d loss / d loss_sum (a scalar):
    dz_i = g * (softmax(z_i) - onehot(y_i))   (zero rows for ignored tokens)
    dh = dz W          dW = dz^T h
Both gradients are computed chunk by chunk during the forward pass (the chunk's logits are freed
right after), and the backward only scales them by g. Peak extra memory is one chunk of logits.

Two ways to do a chunk: the torch path (the CPU path) upcasts the chunk's logits to fp32 and uses
torch's softmax; the Triton path (CUDA) keeps the logits in h's dtype and runs two kernels on them:
`_cross_entropy_fwd_kernel` (one program per row, an online max / sum of exponentials over blocks of
the vocabulary, in fp32) writes lse_i and the row's loss, and `_cross_entropy_bwd_kernel` overwrites the
logits in place with softmax(z_i) - onehot(y_i) = exp(z_i - lse_i) - onehot(y_i), so the gradient needs
no second chunk-sized buffer. Both paths round the logits to h's dtype before the softmax, and the
gradient to h's dtype before the two products.

`linear_cross_entropy` is the public op; `linear_cross_entropy_reference` is the plain PyTorch
definition every test compares against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fasttune.kernels._dispatch import jit, next_pow2, tl, to_dtype, use_triton

IGNORE_INDEX = -100
_MAX_V_BLOCK = 4096


@jit
def _cross_entropy_fwd_kernel(
    z_ptr, y_ptr, lse_ptr, loss_ptr, stride_z, n_cols, ignore_index, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK)
    # Per-lane running max and sum of exp(z - max); lanes start at a finite floor so that masked lanes
    # (z = -inf) give exp(-inf) = 0 rather than exp(-inf + inf) = nan.
    m = tl.full((BLOCK,), -1.0e30, dtype=tl.float32)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for start in range(0, n_cols, BLOCK):
        z = tl.load(z_row + start + cols, mask=start + cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        acc = acc * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(acc * tl.exp(m - m_row), axis=0))
    tl.store(lse_ptr + row, lse)
    y = tl.load(y_ptr + row)
    valid = y != ignore_index
    z_y = tl.load(z_row + tl.where(valid, y, 0)).to(tl.float32)
    tl.store(loss_ptr + row, tl.where(valid, lse - z_y, 0.0))


@jit
def _cross_entropy_bwd_kernel(z_ptr, y_ptr, lse_ptr, stride_z, n_cols, ignore_index, BLOCK: tl.constexpr):
    # In place: the row of logits becomes softmax - onehot (all zeros for an ignored target).
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_z
    cols = tl.arange(0, BLOCK)
    lse = tl.load(lse_ptr + row)
    y = tl.load(y_ptr + row)
    keep = tl.where(y != ignore_index, 1.0, 0.0)
    for start in range(0, n_cols, BLOCK):
        c = start + cols
        mask = c < n_cols
        z = tl.load(z_row + c, mask=mask, other=0.0).to(tl.float32)
        dz = (tl.exp(z - lse) - tl.where(c == y, 1.0, 0.0)) * keep
        tl.store(z_row + c, to_dtype(dz, z_ptr.dtype.element_ty), mask=mask)


def _chunk_loss_and_grad_triton(z: torch.Tensor, y: torch.Tensor, want_grad: bool) -> torch.Tensor:
    """Sum of the chunk's token losses (fp32 scalar); with `want_grad`, z (c, V) becomes dz in place."""
    rows, vocab = z.shape
    block = min(next_pow2(vocab), _MAX_V_BLOCK)
    num_warps = 4 if block <= 1024 else 8
    lse = torch.empty(rows, dtype=torch.float32, device=z.device)
    loss = torch.empty(rows, dtype=torch.float32, device=z.device)
    _cross_entropy_fwd_kernel[(rows,)](z, y, lse, loss, z.stride(0), vocab, IGNORE_INDEX, BLOCK=block,
                                       num_warps=num_warps)
    if want_grad:
        _cross_entropy_bwd_kernel[(rows,)](z, y, lse, z.stride(0), vocab, IGNORE_INDEX, BLOCK=block,
                                           num_warps=num_warps)
    return loss.sum()


# Logits per chunk on CUDA, where the Triton path keeps a chunk in h's dtype (bf16: 256 MiB at 2^27); the
# torch path keeps 2^24 in fp32.
CHUNK_ELEMS_CUDA = 1 << 27


def _chunk_rows(n_rows: int, vocab: int, budget_elems: int = 1 << 24) -> int:
    """Tokens per chunk so that one chunk of logits stays near `budget_elems` elements.

    Rounded down to a multiple of 128 where possible: the matrix units work in tiles of 128 rows, and
    130 rows (a 64 MiB fp32 budget at vocab 128,256) would run two tiles for the price of one.
    """
    rows = max(1, budget_elems // max(vocab, 1))
    if rows >= 128:
        rows -= rows % 128
    return min(n_rows, rows)


def _chunk_loss_and_grad_torch(h, weight, y, loss_sum, want_grad: bool) -> torch.Tensor | None:
    """Adds the chunk's token losses to `loss_sum`; returns dz (c, V) in h's dtype when `want_grad`."""
    z = (h @ weight.t()).float()  # (c, V)
    valid = y != IGNORE_INDEX
    y_safe = torch.where(valid, y, torch.zeros_like(y))
    lse = torch.logsumexp(z, dim=-1)  # (c,)
    picked = z.gather(1, y_safe[:, None]).squeeze(1)  # (c,)
    loss_sum += ((lse - picked) * valid).sum()
    if not want_grad:
        return None
    dz = torch.softmax(z, dim=-1)
    del z
    dz.scatter_add_(1, y_safe[:, None], -torch.ones_like(dz[:, :1]))
    dz *= valid[:, None]
    return dz.to(h.dtype)


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, triton):
        n, _ = hidden.shape
        want_dh = ctx.needs_input_grad[0]
        want_dw = ctx.needs_input_grad[1]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_dh else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        for start in range(0, n, chunk_rows):
            h = hidden[start:start + chunk_rows]
            y = targets[start:start + chunk_rows]
            if triton:
                # (c, V) in h's dtype, turned into dz in place; one name only, so that `del dz` below frees
                # it before the next chunk's product (a second name would keep two chunks alive there)
                dz = h @ weight.t()
                loss_sum += _chunk_loss_and_grad_triton(dz, y, want_dh or want_dw)
            else:
                dz = _chunk_loss_and_grad_torch(h, weight, y, loss_sum, want_dh or want_dw)
            if want_dh and dz.dtype == weight.dtype == grad_h.dtype:
                torch.matmul(dz, weight, out=grad_h[start:start + chunk_rows])  # no chunk-sized temporary
            elif want_dh:
                grad_h[start:start + chunk_rows] = dz @ weight
            if want_dw:
                grad_w += (dz.t() @ h).float()
            del dz
        ctx.save_for_backward(grad_h if want_dh else None, grad_w if want_dw else None)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None, None


_ALL_ROWS = "all"


def target_rows(targets: torch.Tensor) -> torch.Tensor | str:
    """The flat indices of the positions that have a target, or 'all' when every one has: what
    `linear_cross_entropy` keeps. Finding them reads the targets on the host (a sync), so a model calls this
    before queueing its layers, where the wait is short, rather than behind them."""
    return _kept_rows(targets.reshape(-1) != IGNORE_INDEX)


def _kept_rows(keep: torch.Tensor) -> torch.Tensor | str:
    if keep.is_cuda and torch.cuda.is_current_stream_capturing():
        # a captured step (`train.step_graph`) cannot read the targets on the host: every row runs through
        # the product, and the ones without a target add nothing to the loss or its gradient
        return _ALL_ROWS
    return _ALL_ROWS if bool(keep.all()) else keep.nonzero().squeeze(1)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    chunk_rows: int | None = None,
    force_triton: bool | None = None,
    rows: torch.Tensor | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies of `hidden @ weight.T` against `targets`, and the count of trained tokens.

    hidden: (..., H), weight: (V, H), targets: (...) with -100 for ignored positions; `rows`: their
    `target_rows`, if already found (else found here). Returns (loss_sum fp32 scalar, n_tokens int64
    scalar). The per-chunk softmax runs the Triton kernels on CUDA and torch elsewhere
    (`_dispatch.use_triton`).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    keep = y != IGNORE_INDEX
    n_tokens = keep.sum()
    # Positions without a target contribute nothing: drop them before the vocabulary product.
    rows = _kept_rows(keep) if rows is None else rows
    if not isinstance(rows, str):
        h, y = h.index_select(0, rows), y.index_select(0, rows)
    if h.shape[0] == 0:
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float(), n_tokens
    triton = use_triton(h, weight, force=force_triton)
    rows = chunk_rows or _chunk_rows(h.shape[0], weight.shape[0], CHUNK_ELEMS_CUDA if h.is_cuda else 1 << 24)
    return LinearCrossEntropyFunction.apply(h, weight, y, rows, triton), n_tokens


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    y = targets.reshape(-1)
    loss_sum = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (y != IGNORE_INDEX).sum()
