"""The generic path: stock transformers models behind our LMOutput contract, with PEFT LoRA."""

from __future__ import annotations

import pytest
import torch
import transformers

from fasttune.models.base import IGNORE_INDEX
from fasttune.models.generic import GenericCausalLM, apply_lora_generic

V = 97


def gpt2(**kw) -> transformers.PreTrainedModel:
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=64, n_embd=64, n_layer=2, n_head=4,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1,
                                  eos_token_id=2, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def opt(proj_dim: int = 64) -> transformers.PreTrainedModel:
    """proj_dim != hidden_size gives OPT's project_in/project_out (as in opt-350m)."""
    cfg = transformers.OPTConfig(vocab_size=V, hidden_size=64, num_hidden_layers=2, ffn_dim=96,
                                 num_attention_heads=4, max_position_embeddings=64,
                                 word_embed_proj_dim=proj_dim, dropout=0.0,
                                 attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.OPTForCausalLM(cfg)


def gemma2() -> transformers.PreTrainedModel:
    """Soft-capped logits: the chunked loss must not be used."""
    cfg = transformers.Gemma2Config(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    final_logit_softcapping=5.0, pad_token_id=0, bos_token_id=1,
                                    eos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")


BUILDERS = {"gpt2": gpt2, "opt": opt, "opt_project_out": lambda: opt(proj_dim=32), "gemma2": gemma2}
CHUNKED = {"gpt2": True, "opt": True, "opt_project_out": True, "gemma2": False}


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, V, (2, 10), generator=g)
    mask = torch.ones_like(x)
    mask[1, -3:] = 0  # right padding
    labels = x.masked_fill(mask == 0, IGNORE_INDEX)
    labels[0, :3] = IGNORE_INDEX
    targets = torch.cat([labels[:, 1:], torch.full((2, 1), IGNORE_INDEX)], dim=1)
    return x, mask, labels, targets


@pytest.mark.parametrize("name", list(BUILDERS))
def test_loss_logits_and_grads_match_transformers(name):
    torch.manual_seed(0)
    hf = BUILDERS[name]().eval()
    model = GenericCausalLM(hf)
    x, mask, labels, targets = _batch()

    pos = torch.arange(10).expand(2, 10)  # the training batch always carries positions (pads count on)
    out = model(x, position_ids=pos, targets=targets, attention_mask=mask)
    assert model._chunked is CHUNKED[name]
    assert out.logits is None and out.n_tokens.item() == int((targets != IGNORE_INDEX).sum())
    ours = out.loss_sum / out.n_tokens
    theirs = hf(input_ids=x, attention_mask=mask, labels=labels).loss
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)

    emb = model.get_input_embeddings().weight
    (g_ours,) = torch.autograd.grad(ours, emb)
    (g_theirs,) = torch.autograd.grad(theirs, emb)
    torch.testing.assert_close(g_ours, g_theirs, atol=1e-6, rtol=1e-4)

    want = hf(input_ids=x, attention_mask=mask).logits
    torch.testing.assert_close(model(x, attention_mask=mask).logits, want)
    last = model(x, attention_mask=mask, logits_to_keep=1).logits
    assert last.shape == (2, 1, V)


def test_packing_is_refused():
    model = GenericCausalLM(gpt2())
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    with pytest.raises(ValueError, match="packing"):
        model(torch.randint(3, V, (1, 5)), position_ids=pos, targets=torch.randint(3, V, (1, 5)))
    assert GenericCausalLM.supports_packing is False


@pytest.mark.parametrize("name, targets", [("gpt2", "default"), ("opt", ["q_proj", "v_proj"])])
def test_apply_lora_generic_trains_only_lora(tmp_path, name, targets):
    torch.manual_seed(0)
    model = apply_lora_generic(GenericCausalLM(BUILDERS[name]()), r=4, lora_alpha=8, target_modules=targets,
                               random_state=1)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    if targets == "default":  # every linear/Conv1D layer except the head
        assert any("c_attn.lora_A" in n for n in trainable) and any("mlp.c_proj" in n for n in trainable)
        assert not any("lm_head" in n for n in trainable)
    else:
        assert {n.split(".")[-4] for n in trainable} == {"q_proj", "v_proj"}  # ….q_proj.lora_A.default.weight

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, mask, _, tgt = _batch()
    opt_ = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    for _ in range(2):  # B starts at zero, so A moves only from the second step
        out = model.train()(x, targets=tgt, attention_mask=mask)
        (out.loss_sum / out.n_tokens).backward()
        opt_.step()
        opt_.zero_grad()
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n

    model.save_adapter(tmp_path)
    assert (tmp_path / "adapter_config.json").exists() and (tmp_path / "adapter_model.safetensors").exists()


def test_lora_init_is_seeded_and_leaves_the_global_rng_alone():
    def lora_a(seed):
        torch.manual_seed(0)
        m = apply_lora_generic(GenericCausalLM(gpt2()), r=4, random_state=seed)
        return next(p for n, p in m.named_parameters() if "lora_A" in n).detach().clone()

    assert torch.equal(lora_a(5), lora_a(5)) and not torch.equal(lora_a(5), lora_a(6))
    torch.manual_seed(0)
    gpt2()
    expected = torch.rand(3)
    torch.manual_seed(0)
    apply_lora_generic(GenericCausalLM(gpt2()), r=4, random_state=9)
    assert torch.equal(torch.rand(3), expected)


def test_bad_target_names_are_named():
    with pytest.raises(ValueError, match="nonexistent_proj"):
        apply_lora_generic(GenericCausalLM(opt()), target_modules=["nonexistent_proj"])


def test_saved_adapter_reloads_in_peft(tmp_path):
    import peft

    torch.manual_seed(0)
    base = opt()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    model = apply_lora_generic(GenericCausalLM(base), r=4, target_modules=["q_proj", "fc1"])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a non-trivial adapter
    model.save_adapter(tmp_path)
    x, mask, _, _ = _batch()
    want = model.eval()(x, attention_mask=mask).logits

    fresh = opt()
    fresh.load_state_dict(base_state)
    reloaded = peft.PeftModel.from_pretrained(fresh, tmp_path).eval()
    torch.testing.assert_close(reloaded(input_ids=x, attention_mask=mask).logits, want)


@pytest.mark.parametrize("mode", ["on", "offload"])
def test_gradient_checkpointing_matches_off(mode):
    torch.manual_seed(0)
    model = apply_lora_generic(GenericCausalLM(gpt2()), r=4, random_state=0).train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    x, mask, _, tgt = _batch()

    def run():
        model.zero_grad()
        out = model(x, targets=tgt, attention_mask=mask)
        out.loss_sum.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return out.loss_sum.detach(), grads

    ref_loss, ref_grads = run()
    model.set_gradient_checkpointing(mode)
    assert model.gradient_checkpointing == "on"
    loss, grads = run()
    torch.testing.assert_close(loss, ref_loss)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], msg=n)
    model.set_gradient_checkpointing("off")
    assert model.gradient_checkpointing == "off"


def test_kv_cache_and_left_padding_pass_through():
    torch.manual_seed(0)
    model = GenericCausalLM(opt()).eval()
    x = torch.randint(3, V, (1, 9))
    full = model(x).logits
    cache = model.new_kv_cache()
    out = model(x[:, :6], kv_cache=cache)
    step = model(x[:, 6:7], kv_cache=out.kv_cache, attention_mask=torch.ones(1, 7, dtype=torch.long))
    torch.testing.assert_close(step.logits[:, -1], full[:, 6], atol=1e-5, rtol=1e-5)

    prompts = [torch.randint(3, V, (n,)) for n in (6, 3)]
    ids = torch.zeros(2, 6, dtype=torch.long)
    mask = torch.zeros(2, 6, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, 6 - len(p):], mask[i, 6 - len(p):] = p, 1
    last = model(ids, attention_mask=mask).logits[:, -1]
    for i, p in enumerate(prompts):
        torch.testing.assert_close(last[i], model(p[None]).logits[0, -1], atol=1e-5, rtol=1e-5)
