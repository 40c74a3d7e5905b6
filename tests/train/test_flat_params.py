"""Flat parameter buffers: members become views, gradients land in the buffer through every backward path
of our model, the flat optimizer trains exactly like the per-tensor one, and saving is unchanged."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_pre_hook

import fasttune.models.llama as llama
import fasttune.train.loop as loop
from fasttune.config import TrainConfig
from fasttune.lora.apply import apply_lora
from fasttune.lora.peft_format import WEIGHTS_NAME, save_adapter
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM
from fasttune.train.flat_params import ALIGN, FlatParams, flat_optimizer, flatten_params
from fasttune.train.metrics import read_metrics
from fasttune.train.optim import build_optimizer

VOCAB = 37


def tiny_lora_llama(use_kernels: bool = False, dropout: float = 0.0) -> LlamaForCausalLM:
    """The same random model and adapters on every call (B made non-zero so that A gets gradients)."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64), use_kernels=use_kernels)
    apply_lora(model, r=4, lora_alpha=8, lora_dropout=dropout, random_state=1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=g)
    return model


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_members_become_aligned_views_with_their_values():
    shapes = [(3, 5), (7,), (ALIGN,), (2, ALIGN + 1), (1,)]
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    values = [p.detach().clone() for p in params]
    group = FlatParams(params)
    buf = group.param
    assert buf.numel() == sum(-(-p.numel() // ALIGN) * ALIGN for p in params)
    for p, v, (off, _) in zip(params, values, group.spans):
        assert off % ALIGN == 0 and p.is_contiguous() and p.shape == v.shape
        assert p.data_ptr() == buf.data_ptr() + off * buf.element_size()
        assert torch.equal(p, v)
        assert p.grad.data_ptr() == buf.grad.data_ptr() + off * buf.element_size()
    with torch.no_grad():
        buf.add_(1.0)  # what the optimizer does to the buffer, the members see
    assert all(torch.equal(p, v + 1) for p, v in zip(params, values))
    padding = torch.ones(buf.numel(), dtype=torch.bool)
    for off, n in group.spans:
        padding[off:off + n] = False
    assert torch.equal(buf.detach()[padding], torch.ones(int(padding.sum())))


@pytest.mark.parametrize("use_kernels,checkpointing", [
    (False, "off"),      # torch's own accumulation
    (False, "on"),       # torch.utils.checkpoint recomputation
    (True, "off"),       # the fused LoRA autograd Functions (lora_qkv, lora_mlp)
    (True, "offload"),   # LayerRecompute: its inner backward accumulates straight into .grad
])
def test_gradients_accumulate_into_the_buffer(use_kernels, checkpointing, monkeypatch):
    recomputed = []
    real = llama.lora_mlp

    def mlp(*args, layer_pass=None, **kwargs):
        recomputed.append(layer_pass is not None and layer_pass.rerun)
        return real(*args, layer_pass=layer_pass, **kwargs)

    monkeypatch.setattr(llama, "lora_mlp", mlp)
    flat_model, ref_model = tiny_lora_llama(use_kernels), tiny_lora_llama(use_kernels)
    for m in (flat_model, ref_model):
        m.set_gradient_checkpointing(checkpointing)
        m.train()
    (group,) = flatten_params(trainable(flat_model).values())
    views = [p.grad for p in group.members]
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # two micro-batches: the second accumulates onto the first
        ids = torch.randint(0, VOCAB, (2, 9), generator=g)
        targets = torch.randint(0, VOCAB, (2, 9), generator=g)
        for m in (flat_model, ref_model):
            m(input_ids=ids, targets=targets).loss_sum.backward()
    assert any(recomputed) == (checkpointing == "offload")
    for p, view in zip(group.members, views):
        assert p.grad is view  # still the view: nothing allocated a gradient beside the buffer
    ref = trainable(ref_model)
    for (name, p), (off, n) in zip(trainable(flat_model).items(), group.spans):
        assert ref[name].grad.abs().sum() > 0
        torch.testing.assert_close(group.param.grad[off:off + n].view(p.shape), ref[name].grad,
                                   rtol=1e-6, atol=1e-7)


def test_zero_grad_keeps_the_views():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    opt = flat_optimizer(torch.optim.AdamW, params, lr=1e-2)
    views = [p.grad for p in params]
    sum((p**2).sum() for p in params).backward()
    assert opt.param_groups[0]["params"][0].grad.abs().sum() > 0
    opt.zero_grad(set_to_none=True)  # what the loop calls: must not cut the views loose
    assert all(p.grad is v and not v.any() for p, v in zip(params, views))
    assert not opt.param_groups[0]["params"][0].grad.any()


def test_replaced_gradients_are_stepped_and_dropped_buffers_rebuilt():
    params = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = flat_optimizer(torch.optim.AdamW, params, lr=1e-2, weight_decay=0.1)
    ref_opt = torch.optim.AdamW(ref, lr=1e-2, weight_decay=0.1)
    for p, r in zip(params, ref):  # assigned by hand, not accumulated: copied into the buffer at step
        p.grad = torch.full_like(p, 0.5)
        r.grad = torch.full_like(r, 0.5)
    opt.step()
    ref_opt.step()
    assert all(torch.equal(p, r) for p, r in zip(params, ref))

    flat = opt.param_groups[0]["params"][0]
    flat.grad = None  # e.g. a plain zero_grad(set_to_none=True) on the buffer: means "no gradient"
    opt.step()
    ref_opt.zero_grad(set_to_none=False)
    ref_opt.step()  # a zero gradient: only the moments and weight decay move the weights
    assert flat.grad is not None and all(not p.grad.any() for p in params)
    torch.testing.assert_close(params[0], ref[0], rtol=1e-6, atol=1e-7)
    sum(p.sum() for p in params).backward()
    assert torch.equal(flat.grad[:12], torch.ones(12))  # the members' views belong to the new buffer


def per_tensor_optimizer(params, cfg):
    return torch.optim.AdamW([p for p in params if p.requires_grad], lr=cfg.learning_rate,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                             weight_decay=cfg.weight_decay)


def test_flat_training_equals_per_tensor(examples, make_stream, tmp_path, monkeypatch):
    """The real loop (accumulation, clipping, weight decay, schedule, checkpoints) with both optimizers."""
    data = examples(16, vocab=VOCAB)
    cfg = TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=5,
                      learning_rate=1e-2, weight_decay=0.1, max_grad_norm=0.05, warmup_steps=1,
                      lr_scheduler_type="cosine", logging_steps=1, save_steps=2, seed=3)
    optimizers = []
    handle = register_optimizer_step_pre_hook(lambda opt, a, k: optimizers.append(opt))
    weights, records = {}, {}
    try:
        for name in ("flat", "per_tensor"):
            if name == "per_tensor":
                monkeypatch.setattr(loop, "build_optimizer", per_tensor_optimizer)
            model = tiny_lora_llama(dropout=0.1)
            loop.train_loop(model, trainable(model), make_stream(data, 2, seed=4), cfg, tmp_path / name,
                            log=lambda s: None)
            weights[name] = {n: p.detach().clone() for n, p in trainable(model).items()}
            metrics = read_metrics(tmp_path / name / "metrics.jsonl")
            records[name] = [r for r in metrics if r["kind"] == "train"]
    finally:
        handle.remove()
    assert len(optimizers[0].param_groups[0]["params"]) == 1  # the flat run stepped one buffer
    assert len(optimizers[-1].param_groups[0]["params"]) == 2 * 7 * 2
    assert all(r["grad_norm"] > cfg.max_grad_norm for r in records["flat"])  # clipping took part
    for a, b in zip(records["flat"], records["per_tensor"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-6)
    for n, w in weights["per_tensor"].items():
        assert not torch.equal(w, tiny_lora_llama(dropout=0.1).get_parameter(n))  # it trained
        torch.testing.assert_close(weights["flat"][n], w, rtol=1e-6, atol=1e-6)


def test_per_tensor_optimizer_state_resumes_in_the_flat_buffer():
    """A checkpoint written by the per-tensor optimizer (before the flat buffer) continues exactly."""
    model, resumed = tiny_lora_llama(), tiny_lora_llama()
    cfg = TrainConfig(learning_rate=1e-2, weight_decay=0.1)
    ref_opt = per_tensor_optimizer(trainable(model).values(), cfg)
    g = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, VOCAB, (2, 8), generator=g) for _ in range(3)]
    for ids in batches[:2]:
        model(input_ids=ids, targets=ids).loss_sum.backward()
        ref_opt.step()
        ref_opt.zero_grad()
    with torch.no_grad():
        for (_, p), (_, q) in zip(trainable(resumed).items(), trainable(model).items()):
            p.copy_(q)
    opt = build_optimizer(trainable(resumed).values(), cfg)
    opt.load_state_dict(ref_opt.state_dict())
    assert opt.state_dict()["state"][0]["exp_avg"].shape == opt.param_groups[0]["params"][0].shape
    for m, o in ((model, ref_opt), (resumed, opt)):
        m(input_ids=batches[2], targets=batches[2]).loss_sum.backward()
        o.step()
    for (n, p), q in zip(trainable(model).items(), trainable(resumed).values()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=n)


def test_saved_adapter_is_byte_identical(tmp_path):
    flat_model, plain_model = tiny_lora_llama(), tiny_lora_llama()
    build_optimizer(trainable(flat_model).values(), TrainConfig(learning_rate=1e-3))  # flattens the adapters
    assert len({p.untyped_storage().data_ptr() for p in trainable(flat_model).values()}) == 1
    for name, model in (("flat", flat_model), ("plain", plain_model)):
        save_adapter(model, tmp_path / name, base_model_name_or_path="tiny")
    flat_bytes = (tmp_path / "flat" / WEIGHTS_NAME).read_bytes()
    assert flat_bytes == (tmp_path / "plain" / WEIGHTS_NAME).read_bytes()
    loaded = load_file(str(tmp_path / "flat" / WEIGHTS_NAME))
    assert len(loaded) == 2 * 7 * 2
    for name, p in trainable(flat_model).items():
        assert torch.equal(loaded[f"base_model.model.{name}"], p.detach())


def test_groups_by_dtype_and_leaves_tied_tensors_alone():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2, 2, dtype=torch.bfloat16))
    c = torch.nn.Parameter(torch.randn(4))
    opt = build_optimizer([a, b, c], TrainConfig(learning_rate=1e-3))
    flats = opt.param_groups[0]["params"]
    assert [f.dtype for f in flats] == [torch.float32, torch.bfloat16]
    assert [len(g.members) for g in opt.flat_groups] == [2, 1]

    base = torch.randn(6)
    tied = [torch.nn.Parameter(base[:4]), torch.nn.Parameter(base[2:])]  # overlapping memory
    opt = build_optimizer(tied, TrainConfig(learning_rate=1e-3))
    assert opt.param_groups[0]["params"] == tied and not hasattr(opt, "flat_groups")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_8bit"])
def test_cuda_flat_steps_equal_per_tensor(optim):
    """Fused AdamW, and bitsandbytes' 8-bit AdamW (every tensor 8-bit: `ALIGN` keeps its blocks per tensor),
    over the buffer on CUDA, with bf16 autocast, the fused LoRA kernels and LayerRecompute's backward."""
    if optim == "adamw_8bit":
        bnb = pytest.importorskip("bitsandbytes")
        cls, kwargs = bnb.optim.AdamW8bit, dict(lr=1e-2, weight_decay=0.1, min_8bit_size=1)
    else:
        cls, kwargs = torch.optim.AdamW, dict(lr=1e-2, weight_decay=0.1, fused=True)
    runs = []
    for flat in (True, False):
        model = tiny_lora_llama(use_kernels=True).cuda()
        model.set_gradient_checkpointing("offload")
        model.train()
        params = list(trainable(model).values())
        opt = flat_optimizer(cls, params, **kwargs) if flat else cls(params, **kwargs)
        g = torch.Generator().manual_seed(7)
        for _ in range(4):
            for _ in range(2):  # accumulation
                ids = torch.randint(0, VOCAB, (2, 16), generator=g).cuda()
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(input_ids=ids, targets=ids)
                out.loss_sum.float().backward()
            torch.nn.utils.clip_grad_norm_(params, 0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)
        assert len(opt.param_groups[0]["params"]) == (1 if flat else len(params))
        runs.append([p.detach().clone() for p in params])
    initial = list(trainable(tiny_lora_llama()).values())
    for a, b, p0 in zip(*runs, initial):
        assert not torch.equal(b.cpu(), p0.detach())
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_per_tensor_state_inverts_the_flat_layout():
    """A flat optimizer's state split back per tensor (what FSDP2's per-tensor optimizer loads) steps exactly
    as the per-tensor optimizer it came from would, and moves back into the flat layout unchanged."""
    from fasttune.train.flat_params import _flat_state, per_tensor_state

    torch.manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2)]
    per_tensor = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    flat_members = [torch.nn.Parameter(p.detach().clone()) for p in per_tensor]
    plain = torch.optim.AdamW(per_tensor, lr=0.1)
    flat = flat_optimizer(torch.optim.AdamW, flat_members, lr=0.1)
    for _ in range(2):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(per_tensor, flat_members, grads):
            p.grad, q.grad = g.clone(), g.clone()
        plain.step()
        flat.step()
    split = per_tensor_state(flat.state_dict(), [p.shape for p in flat_members])
    want = plain.state_dict()
    assert split["param_groups"][0]["params"] == [0, 1, 2]
    for i in range(3):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(split["state"][i][key], want["state"][i][key])
        assert float(split["state"][i]["step"]) == float(want["state"][i]["step"]) == 2
    back = _flat_state(split, flat.flat_groups)
    torch.testing.assert_close(back["state"][0]["exp_avg"], flat.state_dict()["state"][0]["exp_avg"])
    assert per_tensor_state(want, [p.shape for p in per_tensor]) is want  # already per tensor
