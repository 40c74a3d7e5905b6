"""Adapters on disk in PEFT's format: ours load in PEFT and PEFT's load in ours with the same logits and
the same LoRA gradients (tiny random Llama; transformers' LlamaForCausalLM + PEFT is the reference)."""

from __future__ import annotations

import json

import peft
import pytest
import torch
import transformers

from fasttune.lora.apply import apply_lora, lora_modules
from fasttune.lora.peft_format import load_adapter, read_adapter_config, save_adapter
from fasttune.models.hf import hf_config_from_llama
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM

CFG = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, max_position_embeddings=64)


def _pair(**overrides) -> tuple[LlamaForCausalLM, transformers.PreTrainedModel]:
    """Our tiny model and transformers' with the same random base weights."""
    torch.manual_seed(0)
    cfg = LlamaConfig(**{**CFG, **overrides})
    ours = LlamaForCausalLM(cfg).eval()
    hf = transformers.LlamaForCausalLM(hf_config_from_llama(cfg)).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    return ours, hf


def _randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora_modules(model):
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


IDS = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))


def test_our_adapter_loads_in_peft_with_same_logits(tmp_path):
    ours, hf = _pair()
    base_logits = ours(IDS).logits
    apply_lora(ours, r=4, lora_alpha=8, target_modules=["default"])
    _randomise_lora(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny-llama")
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"])
    assert cfg["base_model_name_or_path"] == "tiny-llama" and cfg["inference_mode"] is True

    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path).eval()
    want = peft_model(input_ids=IDS).logits
    got = ours(IDS).logits
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter really changes the output
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_peft_adapter_loads_in_ours_with_same_logits(tmp_path):
    ours, hf = _pair(tie_word_embeddings=True)
    base_logits = ours(IDS).logits
    lcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                           use_rslora=True, init_lora_weights=False, task_type="CAUSAL_LM")
    torch.manual_seed(5)
    peft_model = peft.get_peft_model(hf, lcfg).eval()
    peft_model.save_pretrained(tmp_path)
    names = load_adapter(ours, tmp_path)  # ours has no LoRA yet: applied from adapter_config.json
    assert len(names) == 2 * 3 and all(n.endswith(("q_proj", "v_proj", "down_proj")) for n in names)
    assert next(m for _, m in lora_modules(ours)).scaling == pytest.approx(16 / 8 ** 0.5)
    got = ours.eval()(IDS).logits
    assert not torch.allclose(got, base_logits, atol=1e-3)  # init_lora_weights=False: B is not zero
    torch.testing.assert_close(got, peft_model(input_ids=IDS).logits, rtol=0, atol=1e-5)


def test_round_trip_through_our_loader_and_regex_targets(tmp_path):
    # adapt only layer 1's q_proj: a last-name list would select layer 0 too, so a regex is written
    ours2, _ = _pair()
    apply_lora(ours2, r=2, lora_alpha=4, target_modules=["layers.1.self_attn.q_proj"])
    _randomise_lora(ours2)
    save_adapter(ours2, tmp_path, base_model_name_or_path=None)
    target = read_adapter_config(tmp_path)["target_modules"]
    assert isinstance(target, str) and "layers\\.1" in target
    fresh, _ = _pair()
    assert load_adapter(fresh, tmp_path) == ["model.layers.1.self_attn.q_proj"]
    torch.testing.assert_close(fresh(IDS).logits, ours2(IDS).logits, rtol=0, atol=0)


def test_lora_gradients_match_peft(tmp_path):
    ours, hf = _pair()
    apply_lora(ours, r=4, lora_alpha=8, target_modules=["all-linear"])
    _randomise_lora(ours)
    save_adapter(ours, tmp_path, base_model_name_or_path="tiny")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path, is_trainable=True)

    targets = torch.cat([IDS[:, 1:], torch.full((2, 1), -100)], dim=1)  # (B, T), shifted as in the contract
    out = ours(IDS, targets=targets)
    loss = out.loss_sum / out.n_tokens
    loss.backward()
    ref = peft_model(input_ids=IDS, labels=IDS).loss  # transformers shifts inside and averages
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-5)

    ours_grads = {n: p.grad for n, p in ours.named_parameters() if p.requires_grad}
    ref_grads = {n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                 for n, p in peft_model.named_parameters() if p.requires_grad}
    assert set(ours_grads) == set(ref_grads) and len(ours_grads) == 2 * 2 * 7
    for name, g in ours_grads.items():
        assert g is not None and g.abs().sum() > 0, name
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_errors_name_the_problem(tmp_path):
    ours, hf = _pair()
    peft.get_peft_model(hf, peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True)).save_pretrained(
        tmp_path / "dora")
    with pytest.raises(ValueError, match="use_dora=True is not supported"):
        load_adapter(ours, tmp_path / "dora")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_adapter(ours, tmp_path)
    # ours has q_proj only; an adapter for v_proj too does not fit
    apply_lora(ours, r=2, lora_alpha=2, target_modules=["q_proj"])
    _, hf2 = _pair()
    peft.get_peft_model(hf2, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"])
                        ).save_pretrained(tmp_path / "qv")
    with pytest.raises(ValueError, match="unexpected.*v_proj"):
        load_adapter(ours, tmp_path / "qv")
    with pytest.raises(ValueError, match="r=8 but the model's LoRA layers have 2"):
        save_adapter(ours, tmp_path / "out", base_model_name_or_path=None, r=8)


def test_wrapped_model_saves_unwrapped_paths(tmp_path):
    ours, _ = _pair()
    apply_lora(ours, r=2, lora_alpha=2, target_modules=["q_proj"])
    wrapper = torch.nn.Module()
    wrapper.module = ours  # as DistributedDataParallel holds it
    save_adapter(wrapper, tmp_path, base_model_name_or_path=None)
    from safetensors.torch import load_file

    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"


def test_seeded_init_draws_peft_s_a_matrices():
    """Unsloth's get_peft_model seeds the global RNG with random_state, then PEFT makes each adapter: the
    same random_state in fasttune gives the very same lora_A values, so both stacks start from the same
    adapters (their loss curves then differ only by the kernels' arithmetic)."""
    ours, hf = _pair()
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    apply_lora(ours, r=4, lora_alpha=8, target_modules=targets, random_state=3407)
    torch.manual_seed(3407)
    theirs = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                       target_modules=targets))
    a_theirs = {n.removeprefix("base_model.model.").replace(".lora_A.default", ".lora_A"): p
                for n, p in theirs.named_parameters() if ".lora_A." in n}
    a_ours = {n: p for n, p in ours.named_parameters() if ".lora_A." in n}
    assert len(a_ours) == 7 * CFG["num_hidden_layers"] and a_ours.keys() == a_theirs.keys()
    for name, a in a_ours.items():
        torch.testing.assert_close(a, a_theirs[name], rtol=0, atol=0, msg=name)
