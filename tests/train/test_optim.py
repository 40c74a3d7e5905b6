"""Schedules against transformers' reference schedules, and the optimiser choices (the flat buffer itself:
test_flat_params.py)."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from fasttune.config import ConfigError, TrainConfig
from fasttune.train.flat_params import ALIGN
from fasttune.train.optim import build_optimizer, build_scheduler, warmup_steps_for


def lrs(scheduler, optimizer, n):
    out = []
    for _ in range(n):
        out.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return out


def make(cfg, total):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([p], cfg)
    return opt, build_scheduler(opt, cfg, total)


def test_known_values():
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=2, lr_scheduler_type="linear")
    opt, sched = make(cfg, 10)
    got = lrs(sched, opt, 11)
    assert got[:3] == pytest.approx([0.0, 5e-4, 1e-3])
    assert got[6] == pytest.approx(1e-3 * (1 - 4 / 8))
    assert got[10] == pytest.approx(0.0)

    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=0, lr_scheduler_type="cosine")
    opt, sched = make(cfg, 10)
    got = lrs(sched, opt, 11)
    assert got[0] == pytest.approx(1e-3) and got[5] == pytest.approx(5e-4) and got[10] == pytest.approx(0.0)

    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=4, lr_scheduler_type="constant")
    opt, sched = make(cfg, 10)
    assert lrs(sched, opt, 10) == pytest.approx([0, 2.5e-4, 5e-4, 7.5e-4] + [1e-3] * 6)


@pytest.mark.parametrize("kind,reference", [
    ("linear", get_linear_schedule_with_warmup),
    ("cosine", get_cosine_schedule_with_warmup),
    ("constant", lambda opt, w, t: get_constant_schedule_with_warmup(opt, w)),
])
@pytest.mark.parametrize("warmup_steps,warmup_ratio", [(0, 0.0), (3, 0.0), (0, 0.1)])
def test_matches_transformers(kind, reference, warmup_steps, warmup_ratio):
    total = 23
    cfg = TrainConfig(learning_rate=2e-4, warmup_steps=warmup_steps, warmup_ratio=warmup_ratio,
                      lr_scheduler_type=kind)
    opt, sched = make(cfg, total)
    p = torch.nn.Parameter(torch.zeros(3))
    ref_opt = torch.optim.AdamW([p], lr=2e-4)
    ref = reference(ref_opt, warmup_steps_for(cfg, total), total)
    assert lrs(sched, opt, total + 1) == pytest.approx(lrs(ref, ref_opt, total + 1), abs=1e-12)


def test_warmup_ratio_rounds_up():
    assert warmup_steps_for(TrainConfig(warmup_steps=0, warmup_ratio=0.1), 25) == 3
    assert warmup_steps_for(TrainConfig(warmup_steps=5, warmup_ratio=0.5), 25) == 5


def test_optimizer_settings():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    frozen = torch.nn.Parameter(torch.zeros(3, 2), requires_grad=False)
    opt = build_optimizer([p, frozen], TrainConfig(learning_rate=3e-4, weight_decay=0.01, adam_beta2=0.95))
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert group["params"] == [p]  # frozen tensors are not handed to the optimiser
    assert (group["lr"], group["weight_decay"], group["betas"]) == (3e-4, 0.01, (0.9, 0.95))


def test_several_tensors_are_stepped_as_one_flat_buffer():
    a, b = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5, 1))
    before = [a.detach().clone(), b.detach().clone()]
    opt = build_optimizer([a, b, a], TrainConfig(learning_rate=3e-4, weight_decay=0.01, adam_beta2=0.95))
    assert isinstance(opt, torch.optim.AdamW)
    (flat,) = opt.param_groups[0]["params"]
    assert flat.numel() == 2 * ALIGN and [g.members for g in opt.flat_groups] == [[a, b]]
    assert (opt.param_groups[0]["lr"], opt.param_groups[0]["betas"]) == (3e-4, (0.9, 0.95))
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])  # moved, values kept
    a.grad.fill_(1.0)
    opt.step()
    assert (a < before[0]).all() and torch.equal(b, before[1] * (1 - 3e-4 * 0.01))  # b: decay only
    state = opt.state_dict()["state"]
    assert list(state) == [0] and state[0]["exp_avg"].shape == (2 * ALIGN,)


def test_biases_and_norm_weights_are_not_decayed_as_in_transformers():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4),
                                torch.nn.Linear(4, 2, bias=False))
    cfg = TrainConfig(learning_rate=1e-3, weight_decay=0.1)
    opt = build_optimizer(model.parameters(), cfg)
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in decayed}
    assert names == set(transformers.Trainer.get_decay_parameter_names(None, model))
    assert names == {"0.weight", "2.weight"}
    assert sum(len(g["params"]) for g in opt.param_groups) == 5
    only_bias = build_optimizer([torch.nn.Parameter(torch.zeros(3))], cfg)
    assert [g["weight_decay"] for g in only_bias.param_groups] == [0.0]


def test_adamw_8bit_on_cpu_is_a_clear_error():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ConfigError, match="adamw_8bit needs a CUDA GPU.*--optim adamw_torch"):
        build_optimizer([p], TrainConfig(optim="adamw_8bit", learning_rate=1e-3))


def test_nothing_trainable_is_an_error():
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([torch.nn.Parameter(torch.zeros(2), requires_grad=False)], TrainConfig())
