"""Our Llama family against transformers' own classes with the same weights, and the model's invariants."""

from __future__ import annotations

import gc

import pytest
import torch
import transformers
from model_cases import loss_and_grads, make_fused_lora_model

from fasttune.memory.layer_pass import LayerPass
from fasttune.models.base import IGNORE_INDEX
from fasttune.models.hf import hf_config_from_llama
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM, RotaryEmbedding, rope_inv_freq


def hf_twin(model: LlamaForCausalLM) -> transformers.PreTrainedModel:
    """The transformers model of the same family holding our weights (strict: every name must match)."""
    hf = transformers.AutoModelForCausalLM.from_config(
        hf_config_from_llama(model.config), attn_implementation="eager"
    )
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.eval()


def shift(labels: torch.Tensor) -> torch.Tensor:
    """HF labels (B, T) -> our targets: targets[t] = labels[t + 1], -100 at the end."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat([labels[:, 1:], pad], dim=1)


def test_logits_loss_and_grads_match_transformers(family_case, tiny_model):
    model = tiny_model(**family_case)
    hf = hf_twin(model)
    x = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))

    torch.testing.assert_close(model(x).logits, hf(x).logits, atol=1e-5, rtol=1e-5)

    labels = x.clone()
    labels[0, :4] = IGNORE_INDEX  # a masked prompt
    labels[1, -2:] = IGNORE_INDEX
    out = model(x, targets=shift(labels))
    assert out.logits is None
    assert out.n_tokens.item() == int((shift(labels) != IGNORE_INDEX).sum())
    ours = out.loss_sum / out.n_tokens
    theirs = hf(x, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    ours.backward()
    theirs.backward()
    hf_params = dict(hf.named_parameters(remove_duplicate=False))
    names = [
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.1.self_attn.o_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ]
    if model.config.attention_bias:
        names.append("model.layers.1.self_attn.v_proj.bias")
    if model.config.qk_norm:
        names += ["model.layers.0.self_attn.q_norm.weight", "model.layers.1.self_attn.k_norm.weight"]
    ours_params = dict(model.named_parameters(remove_duplicate=False))
    for name in names:
        ours_g, hf_g = ours_params[name].grad, hf_params[name].grad
        torch.testing.assert_close(ours_g, hf_g, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("kind", ["llama3", "linear", "dynamic"])
def test_rope_frequencies_match_transformers(kind):
    scaling = {
        "llama3": dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=8192),
        "linear": dict(rope_type="linear", factor=4.0),
        "dynamic": dict(rope_type="dynamic", factor=2.0),
    }[kind]
    cfg = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      rope_scaling=scaling, max_position_embeddings=8192, num_hidden_layers=1)
    hf_cfg = hf_config_from_llama(cfg)
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    seq_len = 20000 if kind == "dynamic" else None
    theirs, _ = ROPE_INIT_FUNCTIONS[kind](hf_cfg, None, seq_len=seq_len)
    ours = rope_inv_freq(128, 500000.0, cfg.rope_scaling, 8192, seq_len=seq_len)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=1e-6)
    assert not torch.allclose(ours, rope_inv_freq(128, 500000.0, None, 8192))  # the scaling did something


def test_tied_head_is_the_embedding_and_loads_without_head_key(tiny_model):
    model = tiny_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    sd = {k: v.clone() + 1.0 for k, v in model.state_dict().items() if k != "lm_head.weight"}
    other = LlamaForCausalLM(model.config)
    other.load_state_dict(sd, strict=True)
    assert torch.equal(other.lm_head.weight, sd["model.embed_tokens.weight"])
    assert other.lm_head.weight is other.model.embed_tokens.weight


def test_meta_device_build_then_assign_load_runs(tiny_model):
    model = tiny_model(rope_scaling=dict(rope_type="linear", factor=2.0))
    with torch.device("meta"):
        shell = LlamaForCausalLM(model.config)
    shell.load_state_dict(model.state_dict(), assign=True)
    x = torch.randint(0, 97, (1, 9))
    torch.testing.assert_close(shell.eval()(x).logits, model(x).logits, atol=0, rtol=0)


def test_rope_tables_stay_fp32_after_casting_the_model():
    rot = RotaryEmbedding(64, 10000.0, None, 4096)
    pos = torch.arange(3000)[None]
    cos32, sin32 = rot(pos, torch.float32)
    rot.to(torch.bfloat16)  # what model.to(bf16) does to every floating buffer
    cos, sin = rot(pos, torch.bfloat16)
    torch.testing.assert_close(cos, cos32.bfloat16(), atol=0, rtol=0)
    torch.testing.assert_close(sin, sin32.bfloat16(), atol=0, rtol=0)


def test_logits_to_keep_returns_the_last_positions(tiny_model):
    model = tiny_model()
    x = torch.randint(0, 97, (2, 7))
    full = model(x).logits
    last = model(x, logits_to_keep=1).logits
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=1e-6)


def test_loss_rows_are_found_before_the_layers_run(tiny_model, monkeypatch):
    """The host reads the targets (which positions have one) before the first layer is queued, not behind
    every layer's work, and the loss is the one found after them."""
    from fasttune.models import llama

    model = tiny_model()
    x = torch.randint(0, 97, (2, 7))
    tgt = torch.cat([x[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    want = model(x, targets=tgt).loss_sum
    order = []
    inner = llama.target_rows
    monkeypatch.setattr(llama, "target_rows", lambda t: (order.append("rows"), inner(t))[1])
    model.model.layers[0].register_forward_pre_hook(lambda *a: order.append("layer 0"))
    got = model(x, targets=tgt).loss_sum
    assert order == ["rows", "layer 0"]
    torch.testing.assert_close(got, want, atol=0, rtol=0)


def test_kernels_on_matches_reference(tiny_model):
    ref = tiny_model(model_type="qwen3", qk_norm=True, head_dim=24)
    fast = tiny_model(use_kernels=True, model_type="qwen3", qk_norm=True, head_dim=24)
    x = torch.randint(0, 97, (2, 13))
    targets = shift(x)
    torch.testing.assert_close(fast(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)
    a, b = fast(x, targets=targets), ref(x, targets=targets)
    torch.testing.assert_close(a.loss_sum, b.loss_sum, atol=1e-4, rtol=1e-5)


def _packed_rows(lengths: list[int], pad: int, seed: int = 3):
    """Rows of random ids with targets masking each row's first token (its 'prompt'), packed into one."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(1, 97, (n,), generator=g) for n in lengths]
    targets = []
    for r in rows:
        t = torch.cat([r[1:], torch.tensor([IGNORE_INDEX])])
        t[0] = IGNORE_INDEX
        targets.append(t)
    ids = torch.cat(rows + [torch.zeros(pad, dtype=torch.long)])[None]
    tgt = torch.cat(targets + [torch.full((pad,), IGNORE_INDEX)])[None]
    pos = torch.cat([torch.arange(n) for n in lengths])
    pos = torch.cat([pos, torch.arange(pad) + lengths[-1]])[None]  # pads continue counting
    return rows, targets, ids, tgt, pos


def test_packed_equals_unpacked(family_case, tiny_model):
    model = tiny_model(**family_case)
    lengths = [5, 3, 6]
    rows, targets, ids, tgt, pos = _packed_rows(lengths, pad=2)
    packed = model(ids, position_ids=pos, targets=tgt)
    singles = [model(r[None], targets=t[None]) for r, t in zip(rows, targets)]
    assert packed.n_tokens.item() == sum(s.n_tokens.item() for s in singles)
    torch.testing.assert_close(packed.loss_sum, sum(s.loss_sum for s in singles), atol=1e-5, rtol=1e-5)

    logits = model(ids, position_ids=pos).logits[0]
    start = 0
    for r in rows:
        alone = model(r[None]).logits[0]
        torch.testing.assert_close(logits[start:start + len(r)], alone, atol=1e-5, rtol=1e-5)
        start += len(r)


def test_packed_batch_differs_from_unmasked_attention(tiny_model):
    """Guard for the test above: without the position restarts, the same tokens give another loss."""
    model = tiny_model()
    _, _, ids, tgt, pos = _packed_rows([5, 3, 6], pad=2)
    packed = model(ids, position_ids=pos, targets=tgt).loss_sum
    plain = model(ids, targets=tgt).loss_sum
    assert not torch.allclose(packed, plain, atol=1e-3)


@pytest.mark.parametrize("mode", ["on", "offload"])
@pytest.mark.parametrize("frozen_base", [False, True])
def test_gradient_checkpointing_matches_off(tiny_model, mode, frozen_base):
    model = tiny_model(model_type="qwen3", qk_norm=True, head_dim=24).train()
    if frozen_base:  # LoRA-like: the embedding is frozen, so layer 0's input does not require grad
        for n, p in model.named_parameters():
            p.requires_grad_("q_proj" in n or "down_proj" in n)
    _, _, ids, tgt, pos = _packed_rows([6, 7], pad=1)
    ref_loss, ref_grads = loss_and_grads(model, ids, tgt, pos)

    calls = []
    hook = model.model.layers[0].mlp.register_forward_pre_hook(lambda *a: calls.append(1))
    model.set_gradient_checkpointing(mode)
    loss, grads = loss_and_grads(model, ids, tgt, pos)
    hook.remove()
    assert len(calls) == 2, "the layer was not recomputed in the backward"
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_offload_moves_exactly_the_layer_inputs_through_the_offloader(tiny_model, monkeypatch):
    from fasttune.memory import offload

    packed, resident, offloaders = [], [], []
    inner = offload.LayerInputOffloader.pack

    def pack(self, t):
        if t.numel():
            packed.append(tuple(t.shape))
            resident.append(self.resident)
            offloaders.append(self)
        return inner(self, t)

    monkeypatch.setattr(offload.LayerInputOffloader, "pack", pack)
    model = tiny_model(num_hidden_layers=3).train()
    model.set_gradient_checkpointing("offload")
    x = torch.randint(0, 97, (2, 9))
    model(x, targets=x).loss_sum.backward()
    assert packed == [(2, 9, 64)] * 3
    # the last recomputed layer's input stays on the device, and is let go once its backward has read it
    assert resident == [False, False, True] and offloaders[-1].host[-1] is None
    assert offloaders[-1].kept == {} and all(h is not None for h in offloaders[-1].host[:-1])
    packed.clear(), resident.clear()
    model.set_gradient_checkpointing("selective", keep_layers=1)  # the last layer keeps its activations
    model(x, targets=x).loss_sum.backward()
    assert packed == [(2, 9, 64)] * 2 and resident == [False, True]


def test_inputs_past_the_hosts_room_stay_on_the_device(tiny_model, monkeypatch):
    """Whole-layer recompute pins one input per layer as far as the host rule has room; the trailing layers
    past it keep theirs on the device (as 'on' would), with the same loss and gradients."""
    from fasttune.memory import host, offload

    resident = []
    inner = offload.LayerInputOffloader.pack

    def pack(self, t):
        if t.numel():
            resident.append(self.resident)
        return inner(self, t)

    monkeypatch.setattr(offload.LayerInputOffloader, "pack", pack)
    # a layer input is 2 x 9 x 64 fp32 = 4,608 bytes, pinned as 8,192: 40% of 30,000 bytes holds one
    monkeypatch.setattr(host, "host_bytes", lambda: 30_000)
    model = tiny_model(num_hidden_layers=4).train()
    x = torch.randint(0, 97, (2, 9))
    model.set_gradient_checkpointing("on")
    ref_loss, ref_grads = loss_and_grads(model, x, x)
    model.set_gradient_checkpointing("offload")
    loss, grads = loss_and_grads(model, x, x)
    assert resident == [False, True, True, True]
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=0, rtol=0, msg=name)
    resident.clear()
    monkeypatch.setattr(host, "host_bytes", lambda: 10_000)  # no room: every input on the device
    model(x, targets=x).loss_sum.backward()
    assert resident == [True] * 4


@pytest.mark.parametrize("mode,keep", [("offload", 0), ("selective", 1)])
def test_recompute_hands_the_residual_gradient_to_the_branch_norms(monkeypatch, mode, keep):
    """Each recomputed layer's two norms take the residual branch's gradient into their input gradient
    (`LayerPass.grad_addend`), except layer 0's first under a frozen embedding (no gradient wanted there);
    loss and gradients stay those of no checkpointing."""
    from fasttune.models import llama

    model = make_fused_lora_model()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(8))
    ref_loss, ref_grads = loss_and_grads(model, ids, ids)
    taken = []
    inner = llama.rms_norm

    def norm(x, *args, grad_addend=None, **kwargs):
        taken.append(grad_addend is not None)
        return inner(x, *args, grad_addend=grad_addend, **kwargs)

    monkeypatch.setattr(llama, "rms_norm", norm)
    model.set_gradient_checkpointing(mode, keep_layers=keep)
    loss, grads = loss_and_grads(model, ids, ids)
    assert sum(taken) == 2 * (3 - keep) - 1
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def _record_results(monkeypatch, module, name: str) -> list:
    """Wrap module.name so that every result it returns is also appended to the returned list."""
    inner, results = getattr(module, name), []

    def recorded(*args):
        results.append(inner(*args))
        return results[-1]

    monkeypatch.setattr(module, name, recorded)
    return results


def _record_weight_shapes(monkeypatch, module, name: str) -> list:
    """Wrap module.name, a product taking (x2, w, ...), so that each call appends w's shape to the list."""
    inner, shapes = getattr(module, name), []

    def recorded(x2, w, *args, **kwargs):
        shapes.append(tuple(w.shape))
        return inner(x2, w, *args, **kwargs)

    monkeypatch.setattr(module, name, recorded)
    return shapes


@pytest.mark.parametrize("mode,keep", [("offload", 0), ("selective", 1)])
def test_recomputed_layers_take_the_forwards_down_adapter_product(monkeypatch, mode, keep):
    """Each recomputed layer's MLP gets h A_d^T from its first forward instead of reading h for it again in
    its backward (`LayerKept.down_a`); loss and gradients stay those of no checkpointing."""
    from fasttune.kernels import lora

    model = make_fused_lora_model()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(8))
    ref_loss, ref_grads = loss_and_grads(model, ids, ids)
    checked = _record_results(monkeypatch, lora, "_kept")
    model.set_gradient_checkpointing(mode, keep_layers=keep)
    loss, grads = loss_and_grads(model, ids, ids)
    handed = [t for t in checked if t.shape[-1] == 4]  # h A_d^T (tokens, r); gate/up are (tokens, inter)
    assert len(handed) == 3 - keep and all(t is not None and t.shape == (22, 4) for t in handed)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("mode,keep", [("offload", 0), ("selective", 1)])
def test_recomputed_layers_add_the_residual_in_the_projections(monkeypatch, mode, keep):
    """A recomputed layer's forward hands each residual to its branch's last projection (o, down), which
    adds it in its product (`LayerPass.residual`, refused under grad mode); loss and gradients stay those of
    no checkpointing."""
    from fasttune.kernels import lora

    model = make_fused_lora_model()
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(9))
    ref_loss, ref_grads = loss_and_grads(model, ids, ids)
    taken = _record_results(monkeypatch, lora, "_residual_rows")
    model.set_gradient_checkpointing(mode, keep_layers=keep)
    loss, grads = loss_and_grads(model, ids, ids)
    taken = [t for t in taken if t is not None]  # the reruns and kept layers run under grad mode: none
    assert len(taken) == 2 * (3 - keep) and all(t.shape == (22, 64) for t in taken)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
    h = torch.zeros(2, 3, 64)
    with pytest.raises(RuntimeError, match="no_grad"):  # grad mode on: the residual would get no gradient
        model.model.layers[0].mlp_branch(h, layer_pass=LayerPass(residual=h))


@pytest.mark.parametrize("keep", [0, 1, 5])
def test_selective_recomputes_only_the_leading_layers(tiny_model, keep):
    model = tiny_model(num_hidden_layers=3).train()
    _, _, ids, tgt, pos = _packed_rows([6, 7], pad=1)
    ref_loss, ref_grads = loss_and_grads(model, ids, tgt, pos)
    calls = [0, 0, 0]
    hooks = [layer.mlp.register_forward_pre_hook(lambda *a, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(model.model.layers)]
    model.set_gradient_checkpointing("selective", keep_layers=keep)
    loss, grads = loss_and_grads(model, ids, tgt, pos)
    for h in hooks:
        h.remove()
    kept = min(keep, 3)
    assert calls == [2] * (3 - kept) + [1] * kept
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


def test_fused_lora_path_matches_unfused(tiny_model, monkeypatch):
    """use_kernels on CPU: lora_qkv and lora_mlp (pure torch here) give the per-projection LoRA results."""
    import fasttune.models.llama as llama_mod
    from fasttune.lora.apply import apply_lora

    model = tiny_model().train()
    apply_lora(model, r=4, lora_alpha=8)
    with torch.no_grad():  # B away from zero, so the adapters change the output
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    _, _, ids, tgt, pos = _packed_rows([6, 7], pad=1)
    ref_loss, ref_grads = loss_and_grads(model, ids, tgt, pos)
    calls = []
    qkv, mlp = llama_mod.lora_qkv, llama_mod.lora_mlp
    monkeypatch.setattr(llama_mod, "lora_qkv", lambda *a: (calls.append("qkv"), qkv(*a))[1])
    monkeypatch.setattr(llama_mod, "lora_mlp", lambda *a, **k: (calls.append("mlp"), mlp(*a, **k))[1])
    model.set_use_kernels(True)
    loss, grads = loss_and_grads(model, ids, tgt, pos)
    assert calls.count("qkv") == calls.count("mlp") == model.config.num_hidden_layers
    torch.testing.assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("mode,keep", [("offload", 0), ("selective", 1)])
def test_recompute_in_halves_matches_off_and_skips_output_products(tiny_model, monkeypatch, mode, keep):
    """Offloading modes on the fused path rerun each half of a layer for its backward, without the o and
    down projections' base products; loss and adapter gradients are those of no checkpointing."""
    from fasttune.kernels import lora as lora_kernels

    model = make_fused_lora_model()
    assert all(layer.recompute_in_halves() for layer in model.model.layers)
    _, _, ids, tgt, pos = _packed_rows([6, 7], pad=1)
    ref_loss, ref_grads = loss_and_grads(model, ids, tgt, pos)

    products = _record_weight_shapes(monkeypatch, lora_kernels, "_forward")
    model.set_gradient_checkpointing(mode, keep_layers=keep)
    loss, grads = loss_and_grads(model, ids, tgt, pos)
    down = (64, 96)  # (hidden, intermediate): the down projection's weight
    assert products.count(down) == 3  # once per layer: never rerun
    assert products.count((64, 64)) == 3 * 2 + 3 - keep  # q, o forward; q rerun in recomputed layers
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("share,kept", [(1.0, 3), (0.5, 2), (0.2, 1)])
def test_gate_up_on_host_replaces_their_recompute_exactly(tiny_model, monkeypatch, share, kept):
    """host_gate_up: that share of the layers hands its gate/up outputs from the forward to its backward
    (through the offloader) instead of rerunning their products; gradients equal the recomputing run's."""
    from fasttune.kernels import lora as lora_kernels

    model = make_fused_lora_model()
    _, _, ids, tgt, pos = _packed_rows([6, 7], pad=1)
    model.set_gradient_checkpointing("offload")
    ref_loss, ref_grads = loss_and_grads(model, ids, tgt, pos)

    products = _record_weight_shapes(monkeypatch, lora_kernels, "_gate_up_product")  # gate and up products
    model.set_gradient_checkpointing("offload", host_gate_up=share, device_gate_up=0)
    loss, grads = loss_and_grads(model, ids, tgt, pos)
    gate_or_up = (96, 64)  # (intermediate, hidden)
    assert products.count(gate_or_up) == 2 * 3 + 2 * (3 - kept)  # forward, and rerun where not kept
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=0, rtol=0, msg=name)
    model.set_gradient_checkpointing("on", host_gate_up=share)  # only offloading modes keep them
    assert model.model.checkpointing.host_gate_up == 0.0
    with pytest.raises(ValueError, match="host_gate_up"):
        model.set_gradient_checkpointing("offload", host_gate_up=1.5)


def test_auto_gate_up_on_host_asks_the_link_rule_with_the_row_length(monkeypatch, request):
    """host_gate_up 'auto' (the default): the plan of a step asks `host.link_gate_up_share` about it, with
    causal rows of the sequence length or, for packed rows, span 0; the layers keep gate/up on the host as it
    answers (here all of them: the gate/up products run in the forward only, gradients exact)."""
    from fasttune.kernels import lora as lora_kernels
    from fasttune.memory import host, plan

    plan._plan.cache_clear()  # plans made with the rule below must not outlive this test
    request.addfinalizer(plan._plan.cache_clear)

    model = make_fused_lora_model()
    _, _, ids, tgt, pos = _packed_rows([6, 7], pad=1)
    model.set_gradient_checkpointing("offload", keep_attention="reference", device_gate_up=0,
                                     host_gate_up=0.0)
    ref_loss, ref_grads = loss_and_grads(model, ids, tgt)
    asked = []

    def rule(tokens, span, *args):
        asked.append((tokens, span))
        return 1.0

    monkeypatch.setattr(host, "link_gate_up_share", rule)
    model.set_gradient_checkpointing("offload", keep_attention="reference", device_gate_up=0)
    assert model.model.checkpointing.host_gate_up == "auto"
    products = _record_weight_shapes(monkeypatch, lora_kernels, "_gate_up_product")
    loss, grads = loss_and_grads(model, ids, tgt)
    assert asked == [(14, 14)] and products.count((96, 64)) == 2 * 3  # forward only: no layer reran them
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=0, rtol=0, msg=name)
    loss_and_grads(model, ids, tgt, pos)
    assert asked[-1] == (14, 0)  # packed rows: their lengths are not known here, so no attention counted
    model.set_gradient_checkpointing("offload", keep_attention="off")
    loss_and_grads(model, ids, tgt)
    settings, shape = model.model.checkpointing, plan.ModelShape.of(model.config)
    step = plan.plan_memory(shape, settings, tokens=14, span=14, act_bytes=4, fused=True)
    assert step.count(gate_up="host") == 0 and len(asked) == 2  # without kept attention: not asked


@pytest.mark.parametrize("mode,keep,on_device,reruns", [
    ("offload", 0, 1, 2), ("offload", 0, 0, 3), ("offload", 0, 2, 1), ("offload", 0, 5, 0),
    ("selective", 0, 1, 2), ("selective", 1, 1, 1), ("selective", 1, 2, 0)])
def test_last_layers_hold_gate_up_on_the_device(tiny_model, monkeypatch, mode, keep, on_device, reruns):
    """device_gate_up: the last that many recomputed layers hand their gate/up outputs to their backward
    on the device instead of rerunning their products (3 layers; selective keep 1 recomputes 2). Gradients
    equal those without checkpointing."""
    from fasttune.kernels import lora as lora_kernels

    model = make_fused_lora_model()
    _, _, ids, tgt, pos = _packed_rows([6, 7], pad=1)
    ref_loss, ref_grads = loss_and_grads(model, ids, tgt, pos)

    products = _record_weight_shapes(monkeypatch, lora_kernels, "_gate_up_product")
    model.set_gradient_checkpointing(mode, keep_layers=keep, device_gate_up=on_device)
    loss, grads = loss_and_grads(model, ids, tgt, pos)
    assert products.count((96, 64)) == 2 * 3 + 2 * reruns  # forward, and the reruns' gate and up
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    with pytest.raises(ValueError, match="device_gate_up"):
        model.set_gradient_checkpointing(mode, device_gate_up=-1)


def test_bad_inputs_raise_clear_errors(tiny_model):
    model = tiny_model()
    x = torch.randint(0, 97, (2, 5))
    with pytest.raises(ValueError, match="targets"):
        model(x, targets=x[:, :4])
    with pytest.raises(ValueError, match="position_ids"):
        model(x, position_ids=torch.arange(4)[None])
    with pytest.raises(ValueError, match="attention_mask"):
        model(x, attention_mask=torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        model.set_gradient_checkpointing("sometimes")
    with pytest.raises(ValueError, match="keep_layers"):
        model.set_gradient_checkpointing("selective", keep_layers=-1)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="model_type"):
        LlamaConfig(model_type="gpt2")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        LlamaConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(ValueError, match="yarn"):
        LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        LlamaConfig(rope_scaling={"rope_type": "llama3", "factor": 8.0})
    assert LlamaConfig(rope_scaling={"type": "default"}).rope_scaling is None
    given = {"type": "linear", "factor": 2.0, "rope_theta": 1e4}
    cfg = LlamaConfig(rope_scaling=given)
    assert cfg.rope_scaling == {"rope_type": "linear", "factor": 2.0} and cfg.rope_scaling is not given
    assert LlamaConfig(hidden_size=64, num_attention_heads=4).head_dim == 16


cuda_only = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.gpu
@cuda_only
def test_packed_equals_unpacked_on_cuda(tiny_model, dtype):
    """The mask path runs SDPA's memory-efficient kernel on CUDA, the causal path flash/efficient."""
    model = tiny_model(model_type="qwen3", qk_norm=True, head_dim=24).cuda().to(dtype)
    rows, targets, ids, tgt, pos = _packed_rows([37, 5, 60], pad=3)
    packed = model(ids.cuda(), position_ids=pos.cuda(), targets=tgt.cuda())
    singles = [model(r[None].cuda(), targets=t[None].cuda()) for r, t in zip(rows, targets)]
    tol = 1e-4 if dtype == torch.float32 else 5e-3  # bf16: a check that the kernels run, fp32 the logic
    total = sum(s.loss_sum for s in singles)
    torch.testing.assert_close(packed.loss_sum, total, atol=tol * total.abs().item(), rtol=tol)


@pytest.mark.gpu
@cuda_only
def test_offload_keeps_layer_inputs_off_the_gpu(tiny_model):
    layers, B, T, H = 12, 2, 2048, 256
    model = tiny_model(hidden_size=H, intermediate_size=H, num_hidden_layers=layers,
                       max_position_embeddings=T).cuda().train()
    for n, p in model.named_parameters():
        p.requires_grad_("q_proj" in n)  # LoRA-like: a frozen base
    x = torch.randint(0, 97, (B, T), device="cuda")
    held, losses = {}, {}
    for mode in ("on", "offload"):
        model.set_gradient_checkpointing(mode)
        gc.collect()  # an earlier test's graphs (reference cycles) must not be freed inside the measurement
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(x, targets=x)
        torch.cuda.synchronize()
        held[mode] = torch.cuda.memory_allocated() - before
        out.loss_sum.backward()
        losses[mode] = out.loss_sum.item()
        del out
        model.zero_grad(set_to_none=True)
    inputs_bytes = layers * B * T * H * 4
    assert held["on"] - held["offload"] >= 0.8 * inputs_bytes, held
    assert losses["on"] == pytest.approx(losses["offload"], rel=1e-6)


@pytest.mark.gpu
@cuda_only
def test_inputs_past_the_hosts_room_stay_on_the_gpu_on_cuda(tiny_model, monkeypatch):
    """With room on the host for 3 of 6 layer inputs, the last 3 stay on the GPU: the backward of the lowest
    of them fetches the layer below from the host ahead of time, the ones above fetch nothing; the loss and
    gradients are those of 'on', and the forward holds the 3 inputs that 'offload' sends away less."""
    from fasttune.memory import host

    layers, B, T, H = 6, 2, 1024, 256
    x_bytes = B * T * H * 4  # fp32, a power of two: pinned as it is
    monkeypatch.setattr(host, "host_bytes", lambda: int(3.5 * x_bytes / host.HOST_SHARE))
    assert host.host_input_layers(layers, x_bytes) == 3
    model = tiny_model(hidden_size=H, intermediate_size=H, num_hidden_layers=layers,
                       max_position_embeddings=T).cuda().train()
    x = torch.randint(0, 97, (B, T), device="cuda")
    results, held = {}, {}
    for mode in ("on", "offload"):
        model.set_gradient_checkpointing(mode)
        gc.collect()
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        out = model(x, targets=x)
        torch.cuda.synchronize()
        held[mode] = torch.cuda.memory_allocated() - before
        del out
        results[mode] = loss_and_grads(model, x, x)
    assert held["on"] - held["offload"] >= 0.8 * 3 * x_bytes, held
    assert held["on"] - held["offload"] < 4 * x_bytes, held
    (ref_loss, ref_grads), (loss, grads) = results["on"], results["offload"]
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.gpu
@cuda_only
def test_offloading_steps_reserve_no_more_memory_as_they_go(tiny_model):
    """The offloader's copies back are allocated on its side stream, whose freed blocks the caching allocator
    keeps for that stream: one stream for every step, so step 8 reuses step 2's blocks and the reserved
    memory stops growing (a new stream per step would let it grow each step)."""
    model = make_fused_lora_model(layers=4, r=8, hidden_size=256, intermediate_size=688,
                                  max_position_embeddings=1024).cuda()
    model.set_gradient_checkpointing("offload")
    x = torch.randint(0, 97, (2, 1024), device="cuda")
    reserved = []
    for _ in range(8):
        loss_and_grads(model, x, x, autocast=True)
        torch.cuda.synchronize()
        reserved.append(torch.cuda.memory_reserved())
    assert reserved[-1] == reserved[1], reserved


@pytest.mark.gpu
@cuda_only
def test_gate_up_on_host_matches_recompute_on_cuda(tiny_model):
    """The side-stream copies of kept gate/up (forward to the host, back one layer ahead) deliver the
    tensors the recompute would have made: same loss and adapter gradients in bf16 autocast."""
    model = make_fused_lora_model(layers=6, r=8, b_std=0.05, hidden_size=256, intermediate_size=688,
                                  max_position_embeddings=1024).cuda()
    x = torch.randint(0, 97, (2, 1024), device="cuda")
    results = {}
    for share in (0.0, 0.5, 1.0):
        model.set_gradient_checkpointing("offload", host_gate_up=share)
        results[share] = loss_and_grads(model, x, x, autocast=True)
    ref_loss, ref_grads = results[0.0]
    for share in (0.5, 1.0):
        loss, grads = results[share]
        assert loss == ref_loss
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-4, msg=name)


def test_a_narrow_micro_batch_keeps_the_layers_its_table_allows_with_the_same_gradients(monkeypatch):
    """Offload with a narrow-batch table: a micro-batch of 18 tokens keeps its last 2 of 3 layers (they are
    not rerun and copy nothing to the host), one of 36 tokens keeps none; loss and gradients are those
    without checkpointing in both."""
    from fasttune.memory import offload

    packed = []
    inner = offload.LayerInputOffloader.pack

    def pack(self, t):
        if t.numel():
            packed.append(self.layer)
        return inner(self, t)

    monkeypatch.setattr(offload.LayerInputOffloader, "pack", pack)
    model = make_fused_lora_model()
    for width, kept_layers in ((9, 2), (18, 0)):
        ids = torch.randint(0, 97, (2, width), generator=torch.Generator().manual_seed(width))
        model.set_gradient_checkpointing("off")
        ref_loss, ref_grads = loss_and_grads(model, ids, ids)
        model.set_gradient_checkpointing("offload", keep_attention="reference", narrow_keep=(20, 18))
        packed.clear()
        calls = []
        hooks = [layer.mlp.register_forward_pre_hook(lambda *a, i=i: calls.append(i))
                 for i, layer in enumerate(model.model.layers)]
        loss, grads = loss_and_grads(model, ids, ids)
        for h in hooks:
            h.remove()
        assert sorted(set(packed)) == list(range(3 - kept_layers)), width
        assert sorted(calls) == sorted([0, 1, 2] + list(range(3 - kept_layers))), width  # reruns
        torch.testing.assert_close(loss, ref_loss, atol=0, rtol=1e-6)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)
