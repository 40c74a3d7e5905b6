"""A right-padded training batch runs padding-free (`models.padding_free`): its real tokens in one packed
row, with the loss and LoRA gradients of its rows run one at a time."""

from __future__ import annotations

import pytest
import torch
from model_cases import TINY, make_fused_lora_model

from fasttune.models.base import IGNORE_INDEX
from fasttune.models.padding_free import unpad_rows

M = IGNORE_INDEX
VOCAB = TINY["vocab_size"]


def _padded(lengths: list[int], width: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    B = len(lengths)
    ids = torch.zeros(B, width, dtype=torch.long)
    targets = torch.full((B, width), M)
    mask = torch.zeros(B, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        row = torch.randint(1, VOCAB, (n,), generator=g)
        ids[b, :n], mask[b, :n] = row, 1
        targets[b, :n - 1] = row[1:]
        targets[b, : 1 + b % 3] = M  # a prompt
    pos = torch.arange(width).expand(B, width).clone()
    return {"input_ids": ids, "position_ids": pos, "targets": targets, "attention_mask": mask}


def test_unpadded_layout():
    b = _padded([3, 5], 6)
    keep, ids, pos, tgt = unpad_rows(b["input_ids"], b["position_ids"], b["attention_mask"], b["targets"])
    assert torch.equal(keep, b["attention_mask"].bool())
    assert ids.shape == (1, 16)  # 8 real tokens, then 8 pads in a row of their own
    assert ids[0, :8].tolist() == b["input_ids"][0, :3].tolist() + b["input_ids"][1, :5].tolist()
    assert pos[0].tolist() == [0, 1, 2, 0, 1, 2, 3, 4] + list(range(8))
    assert tgt[0, :8].tolist() == b["targets"][0, :3].tolist() + b["targets"][1, :5].tolist()
    assert (tgt[0, 8:] == M).all() and (ids[0, 8:] == 0).all()


def test_batches_it_leaves_alone():
    def unpad(b):
        return unpad_rows(b["input_ids"], b["position_ids"], b["attention_mask"], b["targets"])

    assert unpad(_padded([4, 4], 4)) is None  # no padding
    left = _padded([3, 4], 4)
    left["attention_mask"] = left["attention_mask"].flip(1)  # left padding
    assert unpad(left) is None
    shifted = _padded([3, 4], 4)
    shifted["position_ids"] = shifted["position_ids"] + 5  # rows that go on from earlier tokens
    assert unpad(shifted) is None


def _model():
    return make_fused_lora_model(layers=2, b_std=0.3, hidden_size=32, intermediate_size=48,
                                 num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("checkpointing", ["off", "offload"])
def test_padded_batch_loss_and_grads_are_those_of_its_rows_alone(checkpointing):
    lengths = [7, 13, 2, 10]
    batch = _padded(lengths, 16)
    model = _model()
    if checkpointing != "off":
        model.set_gradient_checkpointing(checkpointing, keep_attention="reference")
    params = [p for p in model.parameters() if p.requires_grad]
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    out = model(**batch)
    hook.remove()
    assert seen == [(1, 32)]  # the 32 real tokens in one row (16 divides 32: no pad row)
    out.loss_sum.backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    loss, count = 0.0, 0
    for b, n in enumerate(lengths):  # each row alone, no padding
        row = {k: v[b:b + 1, :n] for k, v in batch.items() if k != "attention_mask"}
        alone = model(**row)
        alone.loss_sum.backward()
        loss, count = loss + alone.loss_sum.detach(), count + int(alone.n_tokens)
    assert int(out.n_tokens) == count
    torch.testing.assert_close(out.loss_sum.detach(), loss, rtol=1e-5, atol=1e-5)
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4 * float(p.grad.abs().max()))


def test_hidden_states_of_a_padded_batch_are_those_of_its_rows_alone():
    """The log-probability path (`hidden_states`, for DPO/KTO/GRPO) runs padding-free too: each real token's
    hidden state and its gradients as with the row alone; zeros at the pads."""
    lengths = [5, 12, 9]
    batch = _padded(lengths, 16, seed=2)
    model = _model()
    params = [p for p in model.parameters() if p.requires_grad]
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    h = model.hidden_states(batch["input_ids"], batch["position_ids"], batch["attention_mask"])
    hook.remove()
    assert seen == [(1, 32)] and h.shape == (3, 16, 32)  # 26 real tokens and a row of 6 pads
    weights = torch.randn(h.shape, generator=torch.Generator().manual_seed(5))
    (h * weights).sum().backward()
    grads = [p.grad.clone() for p in params]
    model.zero_grad(set_to_none=True)
    for b, n in enumerate(lengths):
        alone = model.hidden_states(batch["input_ids"][b:b + 1, :n], batch["position_ids"][b:b + 1, :n])
        torch.testing.assert_close(h[b, :n].detach(), alone[0].detach(), rtol=1e-5, atol=1e-5)
        assert (h[b, n:] == 0).all()
        (alone[0] * weights[b, :n]).sum().backward()
    for g, p in zip(grads, params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-4 * float(p.grad.abs().max()))


def test_sliding_window_models_keep_the_padded_batch():
    """With a sliding window the packed rows would need a dense (N, N) mask: the batch stays padded."""
    model = make_fused_lora_model(layers=2, hidden_size=32, intermediate_size=48, num_attention_heads=4,
                                  num_key_value_heads=2, sliding_window=8)
    batch = _padded([7, 13], 16)
    seen = []
    hook = model.model.register_forward_pre_hook(lambda m, args: seen.append(tuple(args[0].shape)))
    model(**batch)
    hook.remove()
    assert seen == [(2, 16)]
