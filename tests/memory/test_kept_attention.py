"""Kept attention: the backward from a kept O and log-sum-exp equals SDPA's, and a recomputed layer that keeps
them never reruns the attention forward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_cases import loss_and_grads, make_fused_lora_model

from fasttune.memory import kept_attention
from fasttune.memory.estimate import step_plan
from fasttune.memory.kept_attention import (
    KeptAttentionFunction,
    attention_reference_backward,
    attention_reference_forward,
)
from fasttune.memory.layer_pass import LayerKept, LayerPass

cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _keeping(keep_attention: str = "reference", keep_qkv: bool = False) -> LayerPass:
    """A recomputed layer's forward pass that keeps its attention."""
    return LayerPass(keep_attention=keep_attention, keep_qkv=keep_qkv)


def _qkv(B, H, Hk, T, D, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator(device).manual_seed(seed)
    return [torch.randn(B, h, T, D, generator=g, device=device, dtype=dtype) for h in (H, Hk, Hk)]


def _sdpa_grads(q, k, v, d_out):
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    out.backward(d_out)
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("B,H,Hk,T,D", [(2, 4, 2, 7, 16), (1, 3, 3, 1, 8), (1, 6, 1, 13, 24)])
def test_reference_forward_and_backward_match_sdpa(B, H, Hk, T, D):
    q, k, v = _qkv(B, H, Hk, T, D)
    d_out = torch.randn(B, H, T, D)
    ref_out, dq_ref, dk_ref, dv_ref = _sdpa_grads(q, k, v, d_out)
    out, lse = attention_reference_forward(q, k, v)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    kr = k.repeat_interleave(H // Hk, dim=1)
    scores = (q @ kr.transpose(-1, -2) / D**0.5).masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1, keepdim=True), atol=1e-5, rtol=1e-5)
    dq, dk, dv = attention_reference_backward(d_out, q, k, v, out, lse)
    for got, want in ((dq, dq_ref), (dk, dk_ref), (dv, dv_ref)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_kept_function_computes_nothing_forward_and_its_backward_is_sdpas():
    q, k, v = (_bthd(t) for t in _qkv(2, 4, 2, 9, 16, seed=1))  # laid out as the model's
    d_out = torch.randn(2, 4, 9, 16)
    p = _keeping()
    out = kept_attention.attend_kept(q, k, v, p)
    kept = p.kept.attention
    assert kept.out_bthd.shape == (2, 9, 4, 16) and kept.lse.shape == (2, 4, 9, 1)
    qg, kg, vg = (t.clone().requires_grad_(True) for t in (q, k, v))
    again = kept_attention.attend_kept(qg, kg, vg, LayerPass(rerun=True, kept=LayerKept(attention=kept)))
    assert again.data_ptr() == out.data_ptr()  # the kept buffer itself, not a new product
    again.backward(d_out)
    _, dq, dk, dv = _sdpa_grads(q, k, v, d_out)
    for got, want in ((qg.grad, dq), (kg.grad, dk), (vg.grad, dv)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_nothing_kept_off_cuda_unless_the_reference_is_allowed():
    q, k, v = (_bthd(t) for t in _qkv(1, 2, 2, 5, 8))
    assert kept_attention.attend_kept(q, k, v, LayerPass()) is None  # the pass keeps no attention
    p = _keeping("auto")
    assert kept_attention.attend_kept(q, k, v, p) is None
    assert p.kept.attention is None
    assert kept_attention.attend_kept(q, k, v, LayerPass(rerun=True)) is None  # nothing kept for the rerun
    wrong = kept_attention.KeptAttention(torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 4, 1), "reference")
    with pytest.raises(RuntimeError, match="kept output"):  # a kept output of another shape (T=4, not 5)
        kept_attention.attend_kept(q, k, v, LayerPass(rerun=True, kept=LayerKept(attention=wrong)))


def _plain_rows(seed: int = 5):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    tgt = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    return ids, tgt


@pytest.mark.parametrize("mode,keep", [("offload", 0), ("selective", 1)])
def test_recomputed_layers_keep_attention_and_never_rerun_it(monkeypatch, mode, keep):
    """Offloading modes with kept attention: one attention forward per layer (none in the reruns), and the
    loss and adapter gradients of no checkpointing."""
    model = make_fused_lora_model(model_type="qwen3", qk_norm=True)  # GQA 4:2, q/k norms on the rerun path
    ids, tgt = _plain_rows()
    ref_loss, ref_grads = loss_and_grads(model, ids, tgt)

    forwards, sdpa = [], []
    inner_ref, inner_sdpa = kept_attention.attention_reference_forward, F.scaled_dot_product_attention
    monkeypatch.setattr(kept_attention, "attention_reference_forward",
                        lambda *a: (forwards.append(1), inner_ref(*a))[1])
    monkeypatch.setattr(F, "scaled_dot_product_attention",
                        lambda *a, **k: (sdpa.append(1), inner_sdpa(*a, **k))[1])
    model.set_gradient_checkpointing(mode, keep_layers=keep, keep_attention="reference")
    loss, grads = loss_and_grads(model, ids, tgt)
    assert len(forwards) == 3 - keep  # the recomputed layers' forwards, through the hand-off
    assert len(sdpa) == keep  # the kept layers run SDPA once; no rerun runs attention
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)

    forwards.clear(), sdpa.clear()
    model.set_gradient_checkpointing(mode, keep_layers=keep)  # 'auto' off CUDA: attention is rerun
    loss_and_grads(model, ids, tgt)
    assert forwards == [] and len(sdpa) == 3 + (3 - keep)


@pytest.mark.parametrize("mode,keep", [("offload", 0), ("selective", 1)])
def test_recomputed_layers_keep_qkv_and_never_rerun_their_products(monkeypatch, mode, keep, family_case):
    """Kept q, k, v, in every family: where the attention is plain causal and has no q/k norms, the reruns
    ask the q/k/v node for no outputs (no base products, no RoPE, no attention); elsewhere (a sliding window
    shorter than the rows, q/k norms) they rerun as before. Loss and adapter gradients are those of no
    checkpointing and of the rerun that recomputes q, k, v."""
    from fasttune.models import llama

    case = family_case
    model = make_fused_lora_model(**case)
    ids, tgt = _plain_rows(seed=6)
    ref_loss, ref_grads = loss_and_grads(model, ids, tgt)
    reusable = not case.get("qk_norm") and case.get("sliding_window") is None

    outputs, rope = [], []
    inner_qkv, inner_rope = llama.lora_qkv, llama.apply_rope
    monkeypatch.setattr(llama, "lora_qkv", lambda *a, **k: (outputs.append(k.get("outputs", True)),
                                                           inner_qkv(*a, **k))[1])
    monkeypatch.setattr(llama, "apply_rope", lambda *a: (rope.append(1), inner_rope(*a))[1])
    runs = {}
    for keep_qkv in (True, False):
        outputs.clear(), rope.clear()
        model.set_gradient_checkpointing(mode, keep_layers=keep, keep_attention="reference",
                                         keep_qkv=keep_qkv)
        runs[keep_qkv] = loss_and_grads(model, ids, tgt)
        skipped = keep_qkv and reusable
        reruns = 3 - keep
        assert outputs == [True] * 3 + [not skipped] * reruns  # the forwards, then the reruns
        assert len(rope) == 3 + (0 if skipped else reruns)
    for loss, grads in runs.values():
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        assert grads.keys() == ref_grads.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    for name, g in runs[True][1].items():  # the same math in another order: float32 rounding apart
        torch.testing.assert_close(g, runs[False][1][name], atol=1e-6, rtol=1e-5, msg=name)


def test_models_with_qk_norms_keep_no_qkv():
    """q/k norms sit between the products and RoPE: such attentions keep O only, and count no q, k, v."""
    model = make_fused_lora_model(model_type="qwen3", qk_norm=True)
    model.set_gradient_checkpointing("offload", keep_attention="reference")
    assert step_plan(model.config, model.model.checkpointing, batch=1, seq=5).qkv_share == 0.0
    q, k, v = (_bthd(t) for t in _qkv(1, 4, 2, 5, 8))
    sink = []
    for reusable in (False, True):  # without: the caller did not say its q, k, v are reusable
        p = _keeping(keep_qkv=True)
        kept_attention.attend_kept(q, k, v, p, qkv_reusable=reusable)
        sink.append(p.kept.attention)
    assert sink[0].qkv_bthd == () and len(sink[1].qkv_bthd) == 3
    assert [t.shape for t in sink[1].tensors()][2:] == [(1, 5, 4, 8), (1, 5, 2, 8), (1, 5, 2, 8)]


def test_keep_attention_rejects_unknown_values():
    model = make_fused_lora_model(layers=1)
    with pytest.raises(ValueError, match="keep_attention"):
        model.set_gradient_checkpointing("offload", keep_attention="yes")


def _bthd(t: torch.Tensor) -> torch.Tensor:
    """The same values laid out as (B, T, H, D) in memory, as the model's q/k/v and gradients are."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def test_only_token_major_inputs_are_kept():
    """q, k, v laid out (B, T, H, D) in memory, as the model makes them, are kept;
    (B, H, T, D)-contiguous ones take the usual path (the kept cuDNN backward is verified on the model's
    layout only)."""
    q, k, v = _qkv(2, 4, 2, 6, 8)
    p = _keeping()
    assert kept_attention.attend_kept(q, k, v, p) is None
    assert p.kept.attention is None
    assert kept_attention.attend_kept(_bthd(q), _bthd(k), _bthd(v), p) is not None
    assert p.kept.attention is not None


@pytest.mark.gpu
@cuda_only
@pytest.mark.parametrize("H,Hk,T", [(8, 2, 1024), (4, 4, 333)])
@pytest.mark.parametrize("d_layout", ["bthd", "bhtd"])
def test_cudnn_kept_backward_matches_sdpa_on_cuda(H, Hk, T, d_layout):
    """The kept O and lse, through the offloader's round trip (a contiguous host copy), give SDPA's gradients,
    for q/k/v in the model's memory layout and dO in that layout or another."""
    q, k, v = (_bthd(t) for t in _qkv(2, H, Hk, T, 128, dtype=torch.bfloat16, device="cuda", seed=2))
    d_out = torch.randn_like(q)
    d_out = _bthd(d_out) if d_layout == "bthd" else d_out.contiguous()
    if kept_attention._backend(q, k) != "cudnn":
        pytest.skip("SDPA does not pick cuDNN for these tensors here")
    p = _keeping("auto")
    out = kept_attention.attend_kept(q, k, v, p)
    ref_out, *sdpa = _sdpa_grads(q, k, v, d_out)
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)  # the same kernel
    host = [torch.empty(t.shape, dtype=t.dtype).copy_(t) for t in p.kept.attention.tensors()]  # as offloaded
    kept = kept_attention.KeptAttention(*(t.cuda() for t in host), "cudnn", p.kept.attention.extra)
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    KeptAttentionFunction.apply(qg, kg, vg, kept).backward(d_out)
    # ground truth: the fp32 math from the same operands (SDPA's own backward is shown beside it)
    o32, lse32 = attention_reference_forward(*(t.float() for t in (q, k, v)))
    exact = attention_reference_backward(d_out.float(), q.float(), k.float(), v.float(), o32, lse32)
    for name, got, want, s in zip(("dq", "dk", "dv"), (qg.grad, kg.grad, vg.grad), exact, sdpa):
        print(f"{name}: kept {_rel_err(got, want):.2e}, SDPA {_rel_err(s, want):.2e}")
        assert _rel_err(got, want) < 1e-2, (name, _rel_err(got, want), _rel_err(s, want))


@pytest.mark.gpu
@cuda_only
def test_kept_attention_matches_rerun_on_cuda():
    """bf16 autocast, GQA, head_dim 128: the same loss, and adapter gradients within bf16 noise of the run
    that reruns attention (cuDNN's backward may order its sums differently from its first call)."""
    model = make_fused_lora_model(layers=4, r=8, b_std=0.05, hidden_size=512, intermediate_size=688,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=128,
                                  max_position_embeddings=1024).cuda()
    x = torch.randint(0, 97, (2, 1024), device="cuda")
    q = torch.empty(2, 4, 1024, 128, device="cuda", dtype=torch.bfloat16)
    if kept_attention._backend(q, q[:, :2]) != "cudnn":
        pytest.skip("SDPA does not pick cuDNN here")
    results = {}
    for keep, keep_qkv in (("off", False), ("auto", False), ("auto", True)):  # O kept; O, q, k, v kept
        model.set_gradient_checkpointing("offload", keep_attention=keep, keep_qkv=keep_qkv)
        results[keep, keep_qkv] = loss_and_grads(model, x, x, autocast=True)
    ref_loss, ref_grads = results["off", False]
    for loss, grads in (results["auto", False], results["auto", True]):
        assert loss == ref_loss
        for name in grads:  # relative to each gradient's own size: a wrong attention backward is O(1) off
            assert ref_grads[name].norm() > 0, name
            err = _rel_err(grads[name], ref_grads[name])
            assert err < 2e-2, (name, err)
