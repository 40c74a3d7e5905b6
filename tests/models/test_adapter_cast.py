"""Adapters stepped as one flat buffer are read by the fused LoRA kernels from one copy in the compute dtype
(`kernels.adapter_cast`), remade whenever the adapters change, however they change."""

from __future__ import annotations

import pytest
import torch
from model_cases import make_fused_lora_model

from fasttune.kernels import adapter_cast, lora
from fasttune.train.flat_params import flat_optimizer

BF16 = torch.bfloat16


def _adapters(model) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]


def test_a_member_in_the_compute_dtype_is_a_view_of_one_copy_made_once():
    model = make_fused_lora_model()
    params = _adapters(model)
    flat_optimizer(torch.optim.AdamW, params, lr=1e-2)
    first = [adapter_cast.in_dtype(p, BF16) for p in params]
    again = [adapter_cast.in_dtype(p, BF16) for p in params]
    assert all(a is b for a, b in zip(first, again))  # no cast at the second use
    assert len({a.untyped_storage().data_ptr() for a in first}) == 1  # views of one copy
    for p, a in zip(params, first):
        assert a.dtype == BF16 and torch.equal(a, p.detach().to(BF16))
    assert adapter_cast.in_dtype(params[0], torch.float32) is params[0]


def _changes():
    """Ways the adapters change between two uses: (name, function of (optimizer, params))."""

    def step(opt, params):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()

    def raw_step(opt, params):  # as bitsandbytes writes: through the storage, no in-place counter moves
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()

    def load(opt, params):
        with torch.no_grad():
            params[3].copy_(torch.randn_like(params[3]))

    def replaced(opt, params):
        params[5].data = torch.randn_like(params[5])

    return [("optimizer step", step), ("raw optimizer step", raw_step), ("load into one member", load),
            ("member's storage replaced", replaced)]


class RawSGD(torch.optim.SGD):
    """SGD that writes its update through `.data`, as bitsandbytes' optimizers write through raw pointers:
    autograd's in-place counter of the buffer does not move."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.data.add_(p.grad.data, alpha=-group["lr"])


@pytest.mark.parametrize("name,change", _changes(), ids=[c[0] for c in _changes()])
def test_the_copy_is_remade_after_any_change(name, change):
    model = make_fused_lora_model()
    params = _adapters(model)
    opt = flat_optimizer(RawSGD if name.startswith("raw") else torch.optim.AdamW, params, lr=1e-1)
    before = [adapter_cast.in_dtype(p, BF16).clone() for p in params]
    change(opt, params)
    after = [adapter_cast.in_dtype(p, BF16) for p in params]
    changed = 0
    for p, a, b in zip(params, after, before):
        assert torch.equal(a, p.detach().to(BF16)), name
        changed += not torch.equal(a, b)
    assert changed == (1 if name in ("load into one member", "member's storage replaced") else len(params))


def test_training_under_bf16_autocast_reads_the_same_adapters_as_casting_at_each_use(monkeypatch):
    """Three steps of the fused path under CPU bf16 autocast, 8-bit-like raw updates included: the losses and
    adapters equal those of a run that casts at every use."""

    def run(cached: bool):
        if not cached:
            monkeypatch.setattr(lora, "in_dtype", lambda t, dt: t.to(dt))
        model = make_fused_lora_model()
        params = _adapters(model)
        opt = flat_optimizer(RawSGD, params, lr=0.5)
        ids = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(0))
        losses = []
        for _ in range(3):
            with torch.autocast("cpu", dtype=BF16):
                out = model(ids, targets=ids)
            (out.loss_sum / out.n_tokens).backward()
            opt.step()
            opt.zero_grad()
            losses.append(float(out.loss_sum.detach()))
        monkeypatch.undo()
        return losses, [p.detach().clone() for p in params]

    cached_losses, cached_params = run(cached=True)
    plain_losses, plain_params = run(cached=False)
    assert cached_losses == plain_losses and len(set(cached_losses)) == 3  # the adapters moved each step
    for a, b in zip(cached_params, plain_params):
        assert torch.equal(a, b)
