"""The fused decoding step (packed q/k/v and gate/up, addmm residuals, shared mask, grouped GQA) gives the
logits of the model's own step; packing keeps every weight's values and identity; the model still trains."""

from __future__ import annotations

import pytest
import torch
from infer_models import left_pad, make_model
from torch import nn

from fasttune.infer.decode_weights import joined_rows, pack_decode_weights
from fasttune.infer.generate import generate
from fasttune.infer.static_decode import (
    Decoder,
    StaticKV,
    decode_step,
    decode_variant,
    fused_decode_step,
    rope_tables,
)
from fasttune.lora.apply import apply_lora
from fasttune.lora.layer import LoRALinear

CONFIGS = {
    "llama_gqa": dict(model_type="llama"),
    "llama_mha": dict(model_type="llama", num_key_value_heads=4),
    "tied": dict(model_type="llama", tie_word_embeddings=True),
    "qwen2_qkv_bias": dict(model_type="qwen2", attention_bias=True),
    "qwen3_qk_norm": dict(model_type="qwen3", qk_norm=True, head_dim=24),
    "mistral_window": dict(model_type="mistral", sliding_window=5),
    "o_proj_bias": dict(model_type="llama", attention_bias=True, attention_out_bias=True),
}
STEPS = 8


def with_adapters(model: nn.Module, seed: int = 1, targets=("default",)) -> nn.Module:
    """LoRA (default: on all seven projections) with non-zero B (a fresh adapter is the identity)."""
    apply_lora(model, r=4, lora_alpha=8, target_modules=targets, random_state=seed)
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            with torch.no_grad():
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)
    return model.eval()


def run_steps(model, step, packed=None, rope_table=False, per_row=False) -> torch.Tensor:
    """Prefill two left-padded prompts, then STEPS greedy steps of `step`; the logits (STEPS, B, V).
    per_row: give the cache column as one per row, (B,), instead of one shared (1,)."""
    ids, mask = left_pad([[5, 9, 3, 17, 2, 44], [8, 1, 30]])
    B, T = ids.shape
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # a length that is no multiple of 16 (the mask bias pads)
    static = StaticKV(model, B, T + STEPS + 3, rope_table=rope_table)
    out = []
    with torch.no_grad():
        model(ids, position_ids=positions, attention_mask=mask, kv_cache=static.start(mask.bool()))
        token, pos, slot = ids[:, -1:], positions[:, -1:] + 1, torch.tensor([T] * (B if per_row else 1))
        for _ in range(STEPS):
            args = (packed,) if packed is not None else ()
            logits = step(model, static, token, pos, slot, *args)
            out.append(logits.clone())
            token, pos, slot = logits.argmax(-1, keepdim=True), pos + 1, slot + 1
    return torch.stack(out)


@pytest.mark.parametrize("lora", [False, True], ids=["base", "lora"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_fused_step_logits_equal_the_model_step(config, lora):
    model = make_model(**CONFIGS[config])
    if lora:
        with_adapters(model)
    ref = run_steps(model, decode_step)
    packed = pack_decode_weights(model)
    assert packed.n_packed == 2 * model.config.num_hidden_layers  # every group packed
    got = run_steps(model, fused_decode_step, packed)
    assert ref.abs().max() > 1.0  # logits of a peaked distribution, not all near zero
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("config", ["llama_gqa", "qwen3_qk_norm", "mistral_window"])
def test_a_column_per_row_equals_the_shared_column(config):
    model = make_model(**CONFIGS[config])
    for step, packed in ((decode_step, None), (fused_decode_step, pack_decode_weights(model))):
        ref = run_steps(model, step, packed)
        got = run_steps(model, step, packed, per_row=True)
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_rows_at_their_own_columns_equal_each_row_alone():
    """Two sequences of different lengths, each from column 0 of its own row, stepped together: each row's
    logits are those of the same sequence decoded alone (a window of 4 makes the per-row window matter)."""
    model = make_model(model_type="mistral", sliding_window=4)
    prompts = [[5, 9, 3, 17, 2, 44], [8, 1, 30]]

    def alone(prompt):
        static = StaticKV(model, 1, 20)
        ids = torch.tensor([prompt])
        out = []
        with torch.no_grad():
            model(ids, kv_cache=static.start(torch.ones_like(ids, dtype=torch.bool)))
            token, T = ids[:, -1:], len(prompt)
            for i in range(STEPS):
                logits = decode_step(model, static, token, torch.tensor([[T + i]]), torch.tensor([T + i]))
                out.append(logits[0].clone())
                token = logits.argmax(-1, keepdim=True)
        return torch.stack(out)  # (STEPS, V)

    static = StaticKV(model, 2, 20)
    with torch.no_grad():
        for b, prompt in enumerate(prompts):
            ids = torch.tensor([prompt])
            static.key_mask[b, : len(prompt)] = True
            model(ids, kv_cache=static.kv_cache.rows(b, b + 1))
        cols = torch.tensor([len(p) for p in prompts])
        token = torch.tensor([[p[-1]] for p in prompts])
        got = []
        for _ in range(STEPS):
            logits = decode_step(model, static, token, cols[:, None], cols)
            got.append(logits.clone())
            token, cols = logits.argmax(-1, keepdim=True), cols + 1
    got = torch.stack(got)  # (STEPS, 2, V)
    for b, prompt in enumerate(prompts):
        torch.testing.assert_close(got[:, b], alone(prompt), rtol=1e-5, atol=1e-5)


def test_repacking_keeps_values_and_parameters_and_makes_views():
    model = make_model(model_type="qwen2", attention_bias=True)
    params = dict(model.named_parameters())
    before = {k: v.detach().clone() for k, v in params.items()}
    packed = pack_decode_weights(model)
    after = dict(model.named_parameters())
    assert all(after[k] is params[k] for k in params)  # same Parameter objects: optimisers keep working
    assert all(torch.equal(after[k], before[k]) for k in before)
    a = model.model.layers[1].self_attn
    w = [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]
    assert all(t.is_contiguous() for t in w)
    fused = packed.qkv[1].weight
    assert fused.shape == (sum(t.shape[0] for t in w), w[0].shape[1])
    rows = [before[f"model.layers.1.self_attn.{n}.weight"] for n in ("q_proj", "k_proj", "v_proj")]
    assert torch.equal(fused, torch.cat(rows))
    assert all(t.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr() for t in w)
    assert torch.equal(packed.qkv[1].bias, torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]))
    # writing through the projection (as merging does) is what the packed product reads
    with torch.no_grad():
        a.k_proj.weight[0, 0] = 7.0
    assert fused[a.q_proj.weight.shape[0], 0] == 7.0
    # packing again copies nothing: the groups already lie back to back
    ptrs = [p.data_ptr() for p in model.parameters()]
    again = pack_decode_weights(model)
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert again.qkv[1].weight.data_ptr() == fused.data_ptr()


def test_joined_rows_only_for_back_to_back_tensors():
    buf = torch.arange(24.0).view(6, 4)
    assert torch.equal(joined_rows([buf[:2], buf[2:6]]), buf)
    assert joined_rows([buf[2:6], buf[:2]]) is None  # out of order
    assert joined_rows([buf[:2], buf[3:6]]) is None  # a gap
    assert joined_rows([buf[:2], torch.zeros(4, 4)]) is None  # another storage


def lora_grads(model) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    targets = torch.roll(ids, -1, dims=1)
    model.zero_grad()
    out = model(ids, targets=targets)
    (out.loss_sum / out.n_tokens).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("kernels", [False, True], ids=["modules", "fused_lora"])
def test_model_still_trains_after_repacking(kernels):
    plain = with_adapters(make_model(model_type="qwen2", attention_bias=True)).train()
    packed = with_adapters(make_model(model_type="qwen2", attention_bias=True)).train()
    pack_decode_weights(packed)
    for m in (plain, packed):
        m.set_use_kernels(kernels)  # on the CPU: lora_qkv / lora_mlp through their references
    ref, got = lora_grads(plain), lora_grads(packed)
    assert ref.keys() == got.keys() and any("q_proj.lora_A" in k for k in ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=1e-6, atol=1e-7, msg=k)
    assert all(g.abs().sum() > 0 for g in got.values())


def test_groups_that_cannot_share_a_product_stay_apart():
    class Linear8bitLt(nn.Linear):  # bitsandbytes' class name: treated as quantised, never packed
        pass

    model = make_model()
    a0, m1 = model.model.layers[0].self_attn, model.model.layers[1].mlp
    q = a0.q_proj
    a0.q_proj = nn.Linear(q.in_features, q.out_features, bias=True)  # bias on q only
    with torch.no_grad():
        a0.q_proj.weight.copy_(q.weight)
        a0.q_proj.bias.normal_()
    up = m1.up_proj
    m1.up_proj = Linear8bitLt(up.in_features, up.out_features, bias=False)
    with torch.no_grad():
        m1.up_proj.weight.copy_(up.weight)
    ref = run_steps(model, decode_step)
    ptr = a0.k_proj.weight.data_ptr()
    packed = pack_decode_weights(model)
    assert packed.qkv[0] is None and packed.gate_up[1] is None
    assert packed.qkv[1] is not None and packed.gate_up[0] is not None
    assert a0.k_proj.weight.data_ptr() == ptr  # not moved
    torch.testing.assert_close(run_steps(model, fused_decode_step, packed), ref, rtol=1e-5, atol=2e-5)


def test_merged_adapters_after_packing():
    model = with_adapters(make_model())
    packed = pack_decode_weights(model)
    unmerged = run_steps(model, fused_decode_step, packed)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.merge()  # writes into the packed buffers through the views
    torch.testing.assert_close(run_steps(model, fused_decode_step, packed), unmerged, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(run_steps(model, decode_step), unmerged, rtol=1e-4, atol=1e-4)


def test_decoder_packs_once_and_again_after_the_weights_move():
    model = make_model()
    decoder = Decoder(model, "compile", fused=True)  # compiled lazily: only its buffers are used here
    static = decoder.buffers_for(model, 1, 32)
    packed = decoder.packed
    assert packed is not None and packed.n_packed == 4
    assert decoder.buffers_for(model, 1, 32) is static and decoder.packed is packed  # nothing changed
    # reloading the weights by assignment replaces the Parameters' storage: packed anew, fresh buffers
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)
    mlp = model.model.layers[0].mlp
    assert joined_rows([mlp.gate_proj.weight, mlp.up_proj.weight]) is None
    assert decoder.buffers_for(model, 1, 32) is not static
    assert decoder.packed is not packed and decoder.packed.n_packed == 4
    assert joined_rows([mlp.gate_proj.weight, mlp.up_proj.weight]) is not None


def test_decode_variants():
    assert decode_variant(False) == ("eager", False)
    assert decode_variant(True) == ("compile", None)
    assert decode_variant("cuda_graph") == ("cuda_graph", None)
    assert decode_variant("cuda_graph-unfused") == ("cuda_graph", False)
    assert decode_variant("compile-fused") == ("compile", True)
    with pytest.raises(ValueError, match="compile='fused'"):
        decode_variant("fused")
    model = make_model()
    assert not Decoder(model, "compile").fused  # CPU default: the model's own step
    assert not Decoder(model, "eager", fused=True).fused  # eager never packs


@pytest.mark.slow
def test_compiled_fused_generate_equals_eager():
    # adapters on some projections: packed products with LoRA terms, and o/down through addmm_ under compile
    model = make_model(num_hidden_layers=1, model_type="qwen2", attention_bias=True)
    model = with_adapters(model, targets=["q_proj", "v_proj", "gate_proj"])
    ids, mask = left_pad([[5, 9, 3, 17, 2, 44], [8, 1, 30]])
    eager = generate(model, ids, mask, max_new_tokens=10, eos_token_ids=[])
    fused = generate(model, ids, mask, max_new_tokens=10, eos_token_ids=[], compile="compile-fused")
    assert torch.equal(eager, fused)


ROPE_CONFIGS = {
    **CONFIGS,
    "llama3_scaling": dict(model_type="llama", rope_theta=500000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=8)),
    "linear_scaling": dict(model_type="llama", rope_scaling=dict(rope_type="linear", factor=2.0)),
}


@pytest.mark.parametrize("config", list(ROPE_CONFIGS))
def test_rope_tables_give_the_steps_own_rotary_values(config):
    model = make_model(**ROPE_CONFIGS[config])
    cos, sin = rope_tables(model, 40)
    hd = model.config.head_dim
    assert cos.shape == sin.shape == (40, hd) and cos.dtype == torch.float32
    positions = torch.tensor([[0], [7], [39]])  # (B, 1), as a step sees them
    ref_cos, ref_sin = model.model.rotary_emb(positions, torch.float32)  # (B, 1, hd)
    torch.testing.assert_close(cos[positions], ref_cos, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sin[positions], ref_sin, rtol=1e-6, atol=1e-6)
    assert not torch.equal(cos[7], cos[8])  # rows really are per position
    # and the steps that read them give the logits of the steps that compute them
    ref = run_steps(model, decode_step)
    torch.testing.assert_close(run_steps(model, decode_step, rope_table=True), ref, rtol=1e-5, atol=2e-5)
    packed = pack_decode_weights(model)
    got = run_steps(model, fused_decode_step, packed, rope_table=True)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=2e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_steps_read_the_table_when_the_cache_has_one(monkeypatch):
    import fasttune.infer.static_decode as sd

    model = make_model()
    ref = run_steps(model, decode_step, rope_table=True)
    real = sd.rope_tables
    monkeypatch.setattr(sd, "rope_tables", lambda m, n: tuple(t.flip(0) for t in real(m, n)))  # wrong rows
    assert not torch.allclose(run_steps(model, decode_step, rope_table=True), ref, rtol=1e-3, atol=1e-3)
    packed = pack_decode_weights(model)
    assert not torch.allclose(run_steps(model, fused_decode_step, packed, rope_table=True), ref, rtol=1e-3,
                              atol=1e-3)


def test_rope_table_is_a_fixed_buffer_of_the_graph_modes_only():
    dynamic = dict(rope_type="dynamic", factor=2.0)
    model = make_model(rope_scaling=dynamic, max_position_embeddings=32)
    assert rope_tables(model, 32)[0] is not None  # within the trained context: the base frequencies
    assert rope_tables(model, 33) == (None, None)  # beyond it the frequencies change with the length
    model = make_model()
    assert Decoder(model, "eager").buffers_for(model, 1, 32).rope_cos is None
    decoder = Decoder(model, "compile")
    static = decoder.buffers_for(model, 1, 32)
    assert static.rope_cos.shape == (32, model.config.head_dim)
    ptr = static.rope_cos.data_ptr()
    assert decoder.buffers_for(model, 1, 32).rope_cos.data_ptr() == ptr  # a captured graph's address holds
    static.start(torch.ones(1, 4, dtype=torch.bool))
    assert static.rope_cos.data_ptr() == ptr


def test_auto_compile_is_eager_off_the_gpu_and_passes_other_values_through():
    from fasttune.infer.static_decode import resolve_compile

    model = make_model()
    assert resolve_compile(model, "auto") is False  # CPU: the eager step
    for value in (False, True, "cuda_graph", "compile-unfused"):
        assert resolve_compile(model, value) == value
