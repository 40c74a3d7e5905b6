"""Which keys each query sees: causal, packed rows, padding, cache, sliding window; and `attend` itself."""

from __future__ import annotations

import pytest
import torch

from fasttune.models.attention import AttentionMask, attend, build_attention_mask, is_packed


def test_plain_and_right_padded_batches_use_the_causal_fast_path():
    assert build_attention_mask(5).causal
    pos = torch.arange(5).expand(2, 5)
    right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    m = build_attention_mask(5, position_ids=pos, attention_mask=right)
    assert m.causal and m.mask is None


def test_packed_rows_follow_the_documented_example():
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    assert is_packed(pos)
    m = build_attention_mask(8, position_ids=pos)
    assert not m.causal
    assert m.doc_ids.tolist() == [[1, 1, 1, 2, 2, 2, 2, 2]]
    allowed = m.mask[0, 0]
    assert allowed[4].tolist() == [False, False, False, True, True, False, False, False]
    assert allowed[2].tolist() == [True, True, True, False, False, False, False, False]


def test_left_padding_and_cache_offsets():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    m = build_attention_mask(2, attention_mask=mask, past_len=3)
    assert m.mask.shape == (2, 1, 2, 5)
    # Row 0, query at slot 3 sees slots 2, 3 (not the pads, not slot 4); row 1 sees 0..3.
    assert m.mask[0, 0, 0].tolist() == [False, False, True, True, False]
    assert m.mask[1, 0, 1].tolist() == [True] * 5
    # A padding query still sees itself, so SDPA never gets an empty row.
    m = build_attention_mask(5, attention_mask=mask)
    assert m.mask[0, 0, 0].tolist() == [True, False, False, False, False]


def test_single_decoding_step_without_padding_needs_no_mask():
    m = build_attention_mask(1, past_len=7)
    assert not m.causal and m.mask is None


def test_sliding_window():
    m = build_attention_mask(6, sliding_window=3)
    assert m.mask[0, 0, 5].tolist() == [False, False, False, True, True, True]
    assert build_attention_mask(3, sliding_window=3).causal  # short sequences never reach the window


def test_mask_shape_is_checked():
    with pytest.raises(ValueError, match="attention_mask"):
        build_attention_mask(4, attention_mask=torch.ones(1, 3), past_len=2)


@pytest.mark.parametrize("n_kv", [1, 2, 4])
def test_attend_matches_explicit_softmax(n_kv):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 6, 8, generator=g)
    k = torch.randn(2, n_kv, 6, 8, generator=g)
    v = torch.randn(2, n_kv, 6, 8, generator=g)
    rep = 4 // n_kv
    kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = q @ kk.transpose(-1, -2) / 8**0.5
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    want = scores.masked_fill(~causal, float("-inf")).softmax(-1) @ vv
    torch.testing.assert_close(attend(q, k, v, AttentionMask(causal=True)), want, atol=1e-5, rtol=1e-5)
    explicit = AttentionMask(causal=False, mask=causal[None, None])
    torch.testing.assert_close(attend(q, k, v, explicit), want, atol=1e-5, rtol=1e-5)


def test_sdpa_mask_is_one_shared_aligned_bias_under_grad():
    m = build_attention_mask(5, position_ids=torch.tensor([[0, 1, 0, 1, 2]]))
    with torch.no_grad():
        assert m.sdpa_mask(torch.float32) is m.mask  # nothing is saved: let SDPA take the bool mask
    bias = m.sdpa_mask(torch.bfloat16)
    assert bias is m.sdpa_mask(torch.bfloat16) and bias.dtype == torch.bfloat16
    assert bias.stride(-2) % 16 == 0
    assert torch.equal(bias == 0, m.mask) and torch.isneginf(bias[~m.mask]).all()


@pytest.fixture
def flex_backend():
    from fasttune.models.attention import set_attention_backend

    set_attention_backend("flex")
    yield
    set_attention_backend("auto")


def _flex_vs_sdpa(device: str, with_grad: bool) -> None:
    from fasttune.models.attention import set_attention_backend

    torch.manual_seed(0)
    pos = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2], list(range(11))], device=device)
    q, k, v = (torch.randn(2, n, 11, 16, device=device, requires_grad=with_grad) for n in (4, 2, 2))
    outs = {}
    for backend in ("flex", "sdpa"):
        set_attention_backend(backend)
        m = build_attention_mask(11, position_ids=pos, device=pos.device)
        assert m.doc_causal and (m.mask is None) == (backend == "flex")
        for packed in (True, False):
            mask = m if packed else build_attention_mask(11, device=pos.device)
            out = attend(q, k, v, mask)
            grads = torch.autograd.grad((out * out.detach().sin()).sum(), (q, k, v)) if with_grad else ()
            outs[backend, packed] = (out.detach(), *grads)
    for packed in (True, False):
        for a, b in zip(outs["flex", packed], outs["sdpa", packed], strict=True):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert not torch.allclose(outs["flex", True][0], outs["flex", False][0])  # the mask mattered


def test_flex_backend_matches_sdpa_on_packed_and_causal_rows(flex_backend):
    """Eager flex_attention on the CPU (forward only there): the block-mask pattern is the dense mask's."""
    with torch.no_grad():
        _flex_vs_sdpa("cpu", with_grad=False)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_flex_matches_sdpa_on_cuda_forward_and_backward(flex_backend):
    _flex_vs_sdpa("cuda", with_grad=True)


def test_attention_backend_name_is_checked():
    from fasttune.models.attention import set_attention_backend

    with pytest.raises(ValueError, match="attention backend"):
        set_attention_backend("xformers")


def test_compiled_flex_takes_new_batch_widths_without_a_compile_each():
    """The compiled flex_attention of packed and branched rows sees a new batch width at most micro-batches
    of real data: a few compiles serve them all (not one each), and no width falls back to the
    unfused implementation (here compiled for the CPU, forward only)."""
    import warnings

    from torch._dynamo.utils import counters
    from torch.nn.attention.flex_attention import create_block_mask

    import fasttune.models.attention as attention

    # torch's compiled CPU flex attention (inductor's C++ template) under AVX2 returns wrong rows for some
    # heads at widths of 8 mod 16 (torch 2.13); its values are checked where the machine vectorises with
    # AVX-512, its compile counts everywhere (the CUDA kernels' values: the GPU test above)
    from torch._inductor.cpu_vec_isa import pick_vec_isa

    check_values = "avx512" in str(pick_vec_isa())
    torch._dynamo.reset()
    counters.clear()
    saved = dict(attention._compiled_flex)
    attention._compiled_flex.clear()
    try:
        flex = attention._flex_attention(on_cuda=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for width in range(64, 64 + 8 * 11, 8):  # eleven widths: past dynamo's recompile limit of 8
                q = torch.randn(1, 2, width, 16)
                mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, None, None, width, width, device="cpu")
                out = flex(q, q, q, block_mask=mask)
                ref = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
                if check_values:
                    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)
        assert counters["stats"]["unique_graphs"] <= 3  # static, dynamic, dynamic past one 128-block
        assert not [w for w in caught if "without torch.compile" in str(w.message)]
    finally:
        attention._compiled_flex.clear()
        attention._compiled_flex.update(saved)
        torch._dynamo.reset()


def test_the_right_padding_rule_is_read_once_per_unchanged_mask(monkeypatch):
    # the reference and policy passes of a preference step build their masks from the same tensor: the
    # second must not read the rule on the host again, and a changed or different mask must be read anew
    import fasttune.models.attention as attention

    reads = []
    real = attention.right_padded
    monkeypatch.setattr(attention, "right_padded", lambda m: reads.append(1) or real(m))
    pos = torch.tensor([[0, 1, 2, 0, 1, 2]])
    branch = torch.tensor([[0, 0, 1, 1, 2, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    for _ in range(2):
        build_attention_mask(6, position_ids=pos, attention_mask=mask, branch=branch)
    assert len(reads) == 1
    mask[0, 1] = 0  # in place: now padding in the middle, which branched rows refuse
    with pytest.raises(ValueError, match="right-padded"):
        build_attention_mask(6, position_ids=pos, attention_mask=mask, branch=branch)
    assert len(reads) == 2
    other = torch.tensor([[1, 0, 1, 1, 1, 0]])  # a different tensor: read, and refused
    with pytest.raises(ValueError, match="right-padded"):
        build_attention_mask(6, position_ids=pos, attention_mask=other, branch=branch)
    assert len(reads) == 3


def test_masks_made_under_inference_mode_are_read_each_time():
    # inference tensors keep no version counter: a padded prompt under torch.inference_mode must still work
    pos = torch.arange(5).expand(2, 5)
    with torch.inference_mode():
        right = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
        left = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 1, 1, 1]])
        assert build_attention_mask(5, position_ids=pos, attention_mask=right).causal
        m = build_attention_mask(5, position_ids=pos, attention_mask=left)
    assert not m.causal and m.mask[1, 0, 4].tolist() == [False, False, True, True, True]
