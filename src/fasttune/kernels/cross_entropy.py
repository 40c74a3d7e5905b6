"""Linear + cross-entropy over the vocabulary in chunks of tokens, so the (N, V) logits never exist whole.

Forward, for hidden states h (N, H), output weight W (V, H) and targets y (N,), -100 ignored:
    z = h W^T                      (per chunk of tokens, in fp32)
    loss_sum = sum_i [ logsumexp(z_i) - z_i[y_i] ]   over i with y_i != -100
Backward, with g = d loss / d loss_sum (a scalar):
    dz_i = g * (softmax(z_i) - onehot(y_i))   (zero rows for ignored tokens)
    dh = dz W          dW = dz^T h
Both gradients are computed chunk by chunk during the forward pass (the chunk's logits are freed
right after), and the backward only scales them by g. Peak extra memory is one chunk of logits.

`linear_cross_entropy` is the public op; `linear_cross_entropy_reference` is the plain PyTorch
definition every test compares against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def _chunk_rows(n_rows: int, vocab: int, budget_elems: int = 1 << 24) -> int:
    """Tokens per chunk so that one fp32 chunk of logits stays near `budget_elems` (64 MiB)."""
    return max(1, min(n_rows, budget_elems // max(vocab, 1)))


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows):
        n, _ = hidden.shape
        want_dh = ctx.needs_input_grad[0]
        want_dw = ctx.needs_input_grad[1]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_h = torch.empty_like(hidden) if want_dh else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_dw else None
        for start in range(0, n, chunk_rows):
            h = hidden[start:start + chunk_rows]
            y = targets[start:start + chunk_rows]
            z = (h @ weight.t()).float()                                  # (c, V)
            valid = y != IGNORE_INDEX
            y_safe = torch.where(valid, y, torch.zeros_like(y))
            lse = torch.logsumexp(z, dim=-1)                              # (c,)
            picked = z.gather(1, y_safe[:, None]).squeeze(1)              # (c,)
            loss_sum += ((lse - picked) * valid).sum()
            if want_dh or want_dw:
                dz = torch.softmax(z, dim=-1)                             # reuse z's memory footprint
                del z
                dz.scatter_add_(1, y_safe[:, None], -torch.ones_like(dz[:, :1]))
                dz *= valid[:, None]
                dz = dz.to(hidden.dtype)
                if want_dh:
                    grad_h[start:start + chunk_rows] = dz @ weight
                if want_dw:
                    grad_w += (dz.t() @ h).float()
        ctx.save_for_backward(grad_h if want_dh else None, grad_w if want_dw else None)
        ctx.weight_dtype = weight.dtype
        return loss_sum

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of token cross-entropies of `hidden @ weight.T` against `targets`, and the count of trained tokens.

    hidden: (..., H), weight: (V, H), targets: (...) with -100 for ignored positions.
    Returns (loss_sum fp32 scalar, n_tokens int64 scalar).
    """
    h = hidden.reshape(-1, hidden.shape[-1])
    y = targets.reshape(-1)
    keep = y != IGNORE_INDEX
    n_tokens = keep.sum()
    # Positions without a target contribute nothing: drop them before the vocabulary product.
    if not bool(keep.all()):
        idx = keep.nonzero().squeeze(1)
        h, y = h.index_select(0, idx), y.index_select(0, idx)
    if h.shape[0] == 0:
        return (hidden.sum() * 0.0 + weight.sum() * 0.0).float(), n_tokens
    rows = chunk_rows or _chunk_rows(h.shape[0], weight.shape[0])
    return LinearCrossEntropyFunction.apply(h, weight, y, rows), n_tokens


def linear_cross_entropy_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.t()).float()
    y = targets.reshape(-1)
    loss_sum = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (y != IGNORE_INDEX).sum()
