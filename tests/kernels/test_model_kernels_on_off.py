"""A tiny Llama-family model with LoRA trains the same with the kernels on (interpreted) and off."""

from __future__ import annotations

import pytest
import torch

from fasttune.lora.apply import apply_lora
from fasttune.lora.layer import LoRALinear
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM

CONFIGS = {
    "gqa-qkv-bias": dict(num_key_value_heads=2, attention_bias=True),
    "qk-norm": dict(num_key_value_heads=4, qk_norm=True),
}


def _losses(cfg: LlamaConfig, kernels: bool, device: str, steps: int = 3, checkpointing: str = "off",
            random_b: bool = False) -> list[float]:
    """The loss of each step; `random_b`: LoRA B starts random, not zero, so that every adapter gradient
    (A's too) moves the loss from the first step on."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg, use_kernels=kernels)
    apply_lora(model, r=4, lora_alpha=8)
    if random_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0.0, 0.2)
    model.to(device)
    model.set_gradient_checkpointing(checkpointing)
    for m in model.modules():
        if isinstance(m, LoRALinear):
            m.use_kernels = kernels
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
    targets = ids.roll(-1, 1)
    targets[:, -1] = -100
    targets[0, :4] = -100  # a masked prompt
    ids, targets = ids.to(device), targets.to(device)
    losses = []
    for _ in range(steps):
        out = model(ids, targets=targets)
        loss = out.loss_sum / out.n_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CONFIGS))
def test_kernels_on_and_off_give_the_same_loss_curve(device, name, monkeypatch):
    cfg = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, **CONFIGS[name])
    off = _losses(cfg, kernels=False, device=device)
    monkeypatch.setenv("FASTTUNE_TRITON_ON_CPU", "1")  # on the CPU, the public ops run interpreted kernels
    on = _losses(cfg, kernels=True, device=device)
    assert off[-1] < off[0]  # it trains
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_kernels_on_and_off_agree_under_layer_checkpointing(device, monkeypatch):
    """Recomputed layers (offload mode: the last layer stays, the rest rerun). Their forward adds each
    branch's residual in its last product (the rank-r kernel writes residual + adapter term), and the rerun
    skips products; the loss curve is the one without kernels."""
    cfg = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    off = _losses(cfg, kernels=False, device=device, checkpointing="offload", random_b=True)
    monkeypatch.setenv("FASTTUNE_TRITON_ON_CPU", "1")
    on = _losses(cfg, kernels=True, device=device, checkpointing="offload", random_b=True)
    assert off[-1] < off[0]
    torch.testing.assert_close(torch.tensor(on), torch.tensor(off), rtol=1e-5, atol=1e-5)
