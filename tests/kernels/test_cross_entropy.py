"""Chunked linear cross-entropy, Triton and torch chunk paths, vs `linear_cross_entropy_reference`."""

from __future__ import annotations

import weakref

import pytest
import torch
from kernel_checks import assert_bf16_close, assert_fp32_close

from fasttune.kernels.cross_entropy import (
    IGNORE_INDEX,
    linear_cross_entropy,
    linear_cross_entropy_reference,
    target_rows,
)

# (tokens, hidden, vocab, chunk_rows)
SHAPES = [(1, 8, 128, None), (7, 16, 256, 3), (13, 12, 257, 5), (3, 8, 4099, 2)]


def _inputs(n, hidden, vocab, device, seed=0, ignore_every=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden**0.5 * 3
    y = torch.randint(0, vocab, (n,), generator=g)
    if n > 1:
        y[::ignore_every] = IGNORE_INDEX
    return h.to(device), w.to(device), y.to(device)


def _run(fn, h, w, y, **kw):
    h = h.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    loss, n_tok = fn(h, w, y, **kw)
    (loss * 0.5).backward()  # a non-unit upstream gradient checks the backward's scaling
    return [loss.detach(), h.grad, w.grad], n_tok


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_ce_triton_fp32(device, shape):
    n, hd, v, rows = shape
    h, w, y = _inputs(n, hd, v, device)
    kern, n_tok = _run(linear_cross_entropy, h, w, y, chunk_rows=rows, force_triton=True)
    exact, n_ref = _run(linear_cross_entropy_reference, h.double(), w.double(), y)
    assert int(n_tok) == int(n_ref)
    for k, e, what in zip(kern, exact, ["loss", "dh", "dW"]):
        assert_fp32_close(k, e, f"linear_ce {what} {shape}", rtol=2e-5)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_linear_ce_triton_bf16(device, shape):
    n, hd, v, rows = shape
    h, w, y = _inputs(n, hd, v, device, seed=1)
    hb, wb = h.bfloat16(), w.bfloat16()
    kern, _ = _run(linear_cross_entropy, hb, wb, y, chunk_rows=rows, force_triton=True)
    eager, _ = _run(linear_cross_entropy_reference, hb, wb, y)
    exact, _ = _run(linear_cross_entropy_reference, hb.double(), wb.double(), y)
    assert kern[1].dtype == kern[2].dtype == torch.bfloat16
    for k, e, x64, what in zip(kern, eager, exact, ["loss", "dh", "dW"]):
        assert_bf16_close(k, e, x64, f"linear_ce {what} {shape}")


@pytest.mark.parametrize("shape", SHAPES)
def test_linear_ce_torch_path(any_device, shape):
    n, hd, v, rows = shape
    h, w, y = _inputs(n, hd, v, any_device, seed=2)
    kern, _ = _run(linear_cross_entropy, h, w, y, chunk_rows=rows, force_triton=False)
    exact, _ = _run(linear_cross_entropy_reference, h.double(), w.double(), y)
    for k, e, what in zip(kern, exact, ["loss", "dh", "dW"]):
        assert_fp32_close(k, e, f"linear_ce torch {what} {shape}", rtol=2e-5)


def test_linear_ce_paths_agree_and_eval_needs_no_grad(device):
    h, w, y = _inputs(9, 16, 300, device, seed=3)
    with torch.no_grad():
        a, _ = linear_cross_entropy(h, w, y, chunk_rows=4, force_triton=True)
        b, _ = linear_cross_entropy(h, w, y, chunk_rows=4, force_triton=False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_linear_ce_all_ignored(device):
    h, w, y = _inputs(4, 8, 128, device, seed=4)
    kern, n_tok = _run(linear_cross_entropy, h, w, torch.full_like(y, IGNORE_INDEX), force_triton=True)
    assert int(n_tok) == 0 and kern[0].item() == 0.0
    assert not kern[1].any() and not kern[2].any()


def test_linear_ce_extreme_logits_stay_finite(device):
    # Logits of +-1e4: a softmax without the running max would overflow.
    h, w, y = _inputs(3, 4, 130, device, seed=5, ignore_every=10)
    w = w * 2000
    kern, _ = _run(linear_cross_entropy, h, w, y, force_triton=True)
    exact, _ = _run(linear_cross_entropy_reference, h.double(), w.double(), y)
    assert all(torch.isfinite(t).all() for t in kern)
    for k, e, what in zip(kern, exact, ["loss", "dh", "dW"]):
        assert_fp32_close(k, e, f"linear_ce extreme {what}", rtol=1e-4)


def test_linear_ce_public_op_on_cpu_matches_reference():
    h, w, y = _inputs(2 * 5, 16, 256, "cpu", seed=6)
    got, n_tok = linear_cross_entropy(h.view(2, 5, 16), w, y.view(2, 5))
    want, n_ref = linear_cross_entropy_reference(h, w, y)
    torch.testing.assert_close(got, want)
    assert int(n_tok) == int(n_ref)


def test_chunk_kernel_ignores_rows_in_place(device):
    # linear_cross_entropy drops ignored rows before the kernels; the kernels still handle them.
    from fasttune.kernels.cross_entropy import _chunk_loss_and_grad_triton

    g = torch.Generator().manual_seed(7)
    z = (torch.randn(5, 131, generator=g) * 4).to(device)
    y = torch.tensor([3, IGNORE_INDEX, 130, 0, IGNORE_INDEX], device=device)
    ref_loss = torch.nn.functional.cross_entropy(z.double(), y, reduction="sum")
    ref_grad = torch.softmax(z.double(), -1) - torch.nn.functional.one_hot(y.clamp_min(0), 131)
    ref_grad[y == IGNORE_INDEX] = 0
    zz = z.clone()
    loss = _chunk_loss_and_grad_triton(zz, y, want_grad=True)
    assert_fp32_close(loss, ref_loss, "chunk loss")
    assert_fp32_close(zz, ref_grad, "chunk grad (in place)")


def test_target_rows_found_before_give_the_same_loss_and_are_used_as_given():
    h, w, y = _inputs(10, 16, 256, "cpu", seed=7)  # positions 0, 3, 6, 9 ignored
    rows = target_rows(y.view(2, 5))
    assert rows.tolist() == [1, 2, 4, 5, 7, 8]
    assert target_rows(torch.zeros(2, 3, dtype=torch.long)) == "all"
    assert target_rows(torch.full((4,), IGNORE_INDEX)).numel() == 0
    found, n_found = linear_cross_entropy(h, w, y)
    given, n_given = linear_cross_entropy(h, w, y, rows=rows)
    torch.testing.assert_close(given, found)
    assert int(n_given) == int(n_found) == 6
    fewer, _ = linear_cross_entropy(h, w, y, rows=rows[1:])  # one trained row left out: a smaller sum
    assert fewer < given


class _LiveChunks(torch.utils._python_dispatch.TorchDispatchMode):
    """Records, after each matrix product, how many earlier (rows, vocab) logit chunks are still alive."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab, self.chunks, self.alive_at_product = vocab, [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is torch.ops.aten.mm.default:
            self.alive_at_product.append(sum(ref() is not None for ref in self.chunks))
            if out.shape[-1] == self.vocab:
                self.chunks.append(weakref.ref(out))
        return out


@pytest.mark.parametrize("force_triton", [True, False])
def test_linear_ce_keeps_one_logit_chunk_alive(device, force_triton):
    """The chunks exist to bound the loss's memory: a chunk's logits must be freed before the next chunk's
    product, or two chunks are alive at once (on the GPU, the training step's peak)."""
    n, hd, v, rows = 13, 16, 256, 4
    h, w, y = _inputs(n, hd, v, device, seed=2, ignore_every=n)  # one ignored row: 12 kept, 3 chunks
    h.requires_grad_(True)
    mode = _LiveChunks(v)
    with mode:
        loss, _ = linear_cross_entropy(h, w, y, chunk_rows=rows, force_triton=force_triton)
    assert len(mode.chunks) == 3
    assert mode.alive_at_product == [0, 0, 0]  # no earlier chunk alive when a product makes the next
