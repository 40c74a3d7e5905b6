"""The model lets the kernels' scratch (the dequantised weight of a 4-bit base) go before its loss, the
training step's peak, and the backward makes it again."""

from __future__ import annotations

import types

import torch
from model_cases import TINY, make_model
from torch import nn

import fasttune.models.llama as llama
from fasttune.kernels import nf4
from fasttune.lora.apply import apply_lora, lora_modules


class Linear4bit(nn.Linear):
    """bitsandbytes' layer as fasttune's kernels read it: packed NF4 bytes and their quantisation state."""


def _nf4_bases(model: nn.Module) -> None:
    for name, lin in list(model.named_modules()):
        if isinstance(lin, nn.Linear) and name.rsplit(".", 1)[-1].endswith("_proj"):
            q = nf4.quantize_nf4(lin.weight.detach())
            base = Linear4bit(lin.in_features, lin.out_features, bias=False)
            base.weight = nn.Parameter(q.packed.clone(), requires_grad=False)
            base.weight.quant_state = types.SimpleNamespace(
                quant_type="nf4", absmax=q.absmax, shape=torch.Size(q.shape), dtype=torch.float32,
                blocksize=64, code=q.code, nested=False)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, base)


def test_no_dequantised_weight_is_held_at_the_loss(monkeypatch):
    torch.manual_seed(0)
    model = make_model(**TINY)
    _nf4_bases(model)
    apply_lora(model, r=2, lora_alpha=2)
    model.set_use_kernels(True)
    assert all(m.quantized for _, m in lora_modules(model))
    held_at_loss = []
    loss_fn = llama.linear_cross_entropy

    def spy(*args, **kwargs):
        held_at_loss.append(nf4._buffers.held())
        return loss_fn(*args, **kwargs)

    monkeypatch.setattr(llama, "linear_cross_entropy", spy)
    ids = torch.randint(0, TINY["vocab_size"], (2, 8))
    out = model(input_ids=ids, targets=ids)
    assert held_at_loss == [0]
    out.loss_sum.backward()  # the layers' backward dequantises again, into a buffer made anew
    assert nf4._buffers.held() > 0
    assert all(m.lora_A.weight.grad is not None for _, m in lora_modules(model))
