"""Kept attention over packed rows (several rows per sequence, causal within each): the row boundaries as the
variable-length kernel reads them, the masked reference math against SDPA, and recomputed layers of a model
fed packed rows that keep O (and q, k, v) and never rerun attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_cases import loss_and_grads, make_fused_lora_model

from fasttune.memory import kept_attention
from fasttune.memory.kept_attention import (
    KeptAttentionFunction,
    PackedRows,
    attention_reference_backward,
    attention_reference_forward,
)
from fasttune.memory.layer_pass import LayerPass

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _keeping(keep_attention: str = "reference", keep_qkv: bool = False) -> LayerPass:
    """A recomputed layer's forward pass that keeps its attention."""
    return LayerPass(keep_attention=keep_attention, keep_qkv=keep_qkv)


def _doc_ids(position_ids: torch.Tensor) -> torch.Tensor:
    return (position_ids == 0).cumsum(dim=1)  # as build_attention_mask makes them


def _positions(lengths_per_sequence) -> torch.Tensor:
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_sequence])


def test_packed_rows_start_at_each_sequence_and_each_row_change():
    doc = torch.tensor([[1, 1, 2, 2, 2, 3], [0, 1, 1, 1, 1, 1]])
    rows = PackedRows.from_doc_ids(doc)
    assert rows.cu_seqlens.dtype == torch.int32
    assert rows.cu_seqlens.tolist() == [0, 2, 5, 6, 7, 12]
    assert rows.max_len == 5
    one = PackedRows.from_doc_ids(torch.ones(3, 4, dtype=torch.long))  # a row per sequence, same ids
    assert one.cu_seqlens.tolist() == [0, 4, 8, 12] and one.max_len == 4


def _bthd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _sdpa_packed(q, k, v, doc, d_out):
    """SDPA with the block-diagonal causal mask, GQA by repeating k, v; (out, dq, dk, dv)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    T, n_rep = q.shape[2], q.shape[1] // k.shape[1]
    allowed = torch.ones(T, T, dtype=torch.bool).tril() & (doc[:, :, None] == doc[:, None, :])
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(n_rep, 1), v.repeat_interleave(n_rep, 1),
                                         attn_mask=allowed[:, None])
    out.backward(d_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("H,Hk", [(4, 2), (3, 3)])
def test_packed_reference_matches_sdpa_with_the_row_mask(H, Hk):
    g = torch.Generator().manual_seed(3)
    position_ids = _positions([[3, 5, 1, 4], [13]])
    doc = _doc_ids(position_ids)
    q, k, v = (torch.randn(2, h, 13, 16, generator=g) for h in (H, Hk, Hk))
    d_out = torch.randn(2, H, 13, 16, generator=g)
    ref_out, *ref_grads = _sdpa_packed(q, k, v, doc, d_out)
    out, lse = attention_reference_forward(q, k, v, doc)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    # a row's first token sees itself only: lse is its own score
    first = (position_ids[0] == 0).nonzero().squeeze(1)
    own = (q[0] * k[0].repeat_interleave(H // Hk, 0)).sum(-1) / 4.0  # (H, T), scale 1/sqrt(16)
    torch.testing.assert_close(lse[0, :, first, 0], own[:, first], atol=1e-5, rtol=1e-5)
    grads = attention_reference_backward(d_out, q, k, v, out, lse, doc)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    # without the rows' mask the math is plain causal, which differs for packed rows
    plain, _ = attention_reference_forward(q, k, v)
    assert not torch.allclose(plain, ref_out, atol=1e-3)


def test_packed_kept_function_backward_reads_the_rows():
    g = torch.Generator().manual_seed(4)
    doc = _doc_ids(_positions([[4, 5], [2, 7]]))
    q, k, v = (_bthd(torch.randn(2, h, 9, 8, generator=g)) for h in (4, 2, 2))
    d_out = torch.randn(2, 4, 9, 8, generator=g)
    rows = PackedRows.from_doc_ids(doc)
    p = _keeping()
    out = kept_attention.attend_kept(q, k, v, p, rows=rows)
    kept = p.kept.attention
    assert kept.extra == (rows,)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    KeptAttentionFunction.apply(qg, kg, vg, kept).backward(d_out)
    ref_out, *ref_grads = _sdpa_packed(q, k, v, doc, d_out)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for got, want in zip((qg.grad, kg.grad, vg.grad), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("case", [dict(), dict(model_type="qwen3", qk_norm=True)], ids=["llama", "qk_norm"])
@pytest.mark.parametrize("keep_qkv", [True, False])
def test_recomputed_layers_over_packed_rows_never_rerun_attention(monkeypatch, case, keep_qkv):
    """Packed rows through offloaded layers with kept attention: one attention forward per layer, none in
    the reruns, the row mask respected (loss and adapter gradients of no checkpointing, which runs SDPA with
    the dense mask); q, k, v kept where the attention allows (no q/k norms)."""
    from fasttune.models import llama

    model = make_fused_lora_model(**case)
    g = torch.Generator().manual_seed(7)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    position_ids = _positions([[4, 3, 4], [6, 5]])
    tgt = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    tgt[position_ids.roll(-1, dims=1) == 0] = -100  # no target across a row's end
    ref_loss, ref_grads = loss_and_grads(model, ids, tgt, position_ids)

    forwards, sdpa, outputs = [], [], []
    inner_ref, inner_sdpa, inner_qkv = (kept_attention.attention_reference_forward,
                                        F.scaled_dot_product_attention, llama.lora_qkv)
    monkeypatch.setattr(kept_attention, "attention_reference_forward",
                        lambda *a: (forwards.append(a[3] is not None), inner_ref(*a))[1])
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: (sdpa.append(1), inner_sdpa(*a, **k))[1])
    monkeypatch.setattr(llama, "lora_qkv", lambda *a, **k: (outputs.append(k.get("outputs", True)),
                                                           inner_qkv(*a, **k))[1])
    model.set_gradient_checkpointing("offload", keep_attention="reference", keep_qkv=keep_qkv)
    loss, grads = loss_and_grads(model, ids, tgt, position_ids)
    assert forwards == [True] * 3 and sdpa == []  # each layer's forward, with the rows; no rerun
    skipped = keep_qkv and not case.get("qk_norm")
    assert outputs == [True] * 3 + [not skipped] * 3
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("H,Hk", [(8, 2), (4, 4)])
def test_flash_varlen_kept_backward_matches_the_math_on_cuda(H, Hk):
    """Packed bf16 rows on the variable-length flash kernel: O against the fp32 math, and the gradients from
    the kept O and lse after the offloader's round trip (a contiguous host copy)."""
    g = torch.Generator("cuda").manual_seed(5)
    position_ids = _positions([[300, 700, 24], [1, 511, 512]]).cuda()
    doc = _doc_ids(position_ids)
    q, k, v = (_bthd(torch.randn(2, h, 1024, 128, generator=g, device="cuda", dtype=torch.bfloat16))
               for h in (H, Hk, Hk))
    d_out = _bthd(torch.randn(2, H, 1024, 128, generator=g, device="cuda", dtype=torch.bfloat16))
    rows = PackedRows.from_doc_ids(doc)
    if kept_attention._backend(q, k, rows) != "flash_varlen":
        pytest.skip("the flash kernel does not run here")
    p = _keeping("auto")
    out = kept_attention.attend_kept(q, k, v, p, rows=rows)
    kept = p.kept.attention
    o32, lse32 = attention_reference_forward(*(t.float() for t in (q, k, v)), doc)
    assert _rel_err(out, o32) < 1e-2
    host = [torch.empty(t.shape, dtype=t.dtype).copy_(t) for t in kept.tensors()]  # as the offloader
    kept = kept_attention.KeptAttention(*(t.cuda() for t in host), kept.backend, kept.extra)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    KeptAttentionFunction.apply(qg, kg, vg, kept).backward(d_out)
    exact = attention_reference_backward(d_out.float(), q.float(), k.float(), v.float(), o32, lse32, doc)
    for name, got, want in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), exact):
        assert _rel_err(got, want) < 1e-2, (name, _rel_err(got, want))


@pytest.mark.gpu
@cuda_only
def test_packed_kept_attention_matches_rerun_on_cuda():
    """bf16 autocast, GQA, head_dim 128, packed rows: the loss and adapter gradients of the run that reruns
    attention (flex), within bf16 noise (the two runs use different attention kernels)."""
    model = make_fused_lora_model(layers=4, r=8, b_std=0.05, hidden_size=512, intermediate_size=688,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                  max_position_embeddings=1024).cuda()
    x = torch.randint(0, 97, (2, 1024), device="cuda")
    position_ids = _positions([[100, 400, 524], [1024]]).cuda()
    results = {}
    for keep, keep_qkv in (("off", False), ("auto", False), ("auto", True)):
        model.set_gradient_checkpointing("offload", keep_attention=keep, keep_qkv=keep_qkv)
        results[keep, keep_qkv] = loss_and_grads(model, x, x, position_ids, autocast=True)
    ref_loss, ref_grads = results["off", False]
    for loss, grads in (results["auto", False], results["auto", True]):
        assert abs(loss.item() - ref_loss.item()) < 1e-2 * abs(ref_loss.item())
        for name in grads:
            assert ref_grads[name].norm() > 0, name
            err = _rel_err(grads[name], ref_grads[name])
            assert err < 3e-2, (name, err)


@pytest.mark.parametrize("H,Hk", [(4, 2), (3, 3)])
def test_packed_attention_node_matches_sdpa_with_the_row_mask(H, Hk):
    """The node of layers that are not recomputed (reference backend off CUDA): O and dq, dk, dv of SDPA under
    the block-diagonal causal mask; None for inputs the kernel does not take."""
    g = torch.Generator().manual_seed(4)
    doc = _doc_ids(_positions([[2, 6, 3], [4, 7]]))
    q, k, v = (_bthd(torch.randn(2, h, 11, 16, generator=g)) for h in (H, Hk, Hk))
    d_out = torch.randn(2, H, 11, 16, generator=g)
    ref_out, *ref_grads = _sdpa_packed(q, k, v, doc, d_out)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    rows = PackedRows.from_doc_ids(doc)
    out = kept_attention.packed_attention(qg, kg, vg, rows, reference=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    out.backward(d_out)
    for got, want in zip((qg.grad, kg.grad, vg.grad), ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert kept_attention.packed_attention(q, k, v, rows) is None  # off CUDA only with the reference
    head_major = q.contiguous()  # (B, H, T, D) memory: not the layout the kernel was verified on
    assert kept_attention.packed_attention(head_major, k, v, rows, reference=True) is None


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("H,Hk", [(8, 2), (4, 4)])
def test_packed_attention_runs_the_varlen_kernel_for_layers_not_recomputed_on_cuda(H, Hk, monkeypatch):
    """`attend` on packed bf16 rows without a LayerPass: the varlen flash node (flex is not called), O and
    the gradients against the fp32 math."""
    from fasttune.models import attention

    g = torch.Generator("cuda").manual_seed(6)
    position_ids = _positions([[300, 700, 24], [1, 511, 512]]).cuda()
    q, k, v = (_bthd(torch.randn(2, h, 1024, 128, generator=g, device="cuda", dtype=torch.bfloat16))
               for h in (H, Hk, Hk))
    d_out = torch.randn(2, H, 1024, 128, generator=g, device="cuda", dtype=torch.bfloat16)
    mask = attention.build_attention_mask(1024, position_ids=position_ids, device="cuda", head_dim=128)
    assert mask.doc_causal and mask.mask is None
    if kept_attention._backend(q, k, attention.packed_rows(mask)) != "flash_varlen":
        pytest.skip("the flash kernel does not run here")

    def no_flex(on_cuda):
        raise AssertionError("flex ran")

    monkeypatch.setattr(attention, "_flex_attention", no_flex)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = attention.attend(qg, kg, vg, mask)
    out.backward(d_out)
    doc = _doc_ids(position_ids)
    o32, lse32 = attention_reference_forward(*(t.float() for t in (q, k, v)), doc)
    assert _rel_err(out, o32) < 1e-2
    exact = attention_reference_backward(d_out.float(), q.float(), k.float(), v.float(), o32, lse32, doc)
    for name, got, want in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), exact):
        assert _rel_err(got, want) < 1e-2, (name, _rel_err(got, want))
