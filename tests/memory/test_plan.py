"""The activation-memory plan: what each mode makes of each layer, the host rule's order, the cache, the
settings' validation, and the line the run log prints."""

from __future__ import annotations

import pytest

from fasttune.memory import host
from fasttune.memory.plan import LayerPlan, ModelShape, plan_memory
from fasttune.memory.settings import Checkpointing, parse_host_gate_up

GiB = 2**30
# Llama-3.1-8B's shape: a layer input at 8 x 2048 bf16 is 128 MiB, its q, k, v 1.5 times that
SHAPE = ModelShape(layers=32, hidden=4096, intermediate=14336, heads=32, kv_heads=8, head_dim=128,
                   qk_norm=False)


def plan(mode="offload", tokens=8 * 2048, span=2048, fused=True, **options):
    settings = Checkpointing(mode, **options)
    return plan_memory(SHAPE, settings, tokens=tokens, span=span, act_bytes=2, fused=fused)


@pytest.fixture
def big_host(monkeypatch):
    monkeypatch.setattr(host, "host_bytes", lambda: 128 * GiB)


def test_each_mode_plans_its_layers(big_host):
    assert plan("off").layers == (LayerPlan(),) * 32
    assert plan("on").layers == (LayerPlan("whole"),) * 32
    p = plan("offload", host_gate_up=0.0)
    assert p.layers[:31] == (LayerPlan("halves", "host"),) * 31
    assert p.layers[31] == LayerPlan("halves", "device", "device")  # the first device_gate_up layer
    assert p.keep_attention == "auto" and p.keep_qkv and p.qkv_share == 1.5
    p = plan("offload", fused=False)  # the reference path: whole layers, the last input on the GPU
    assert p.layers == (LayerPlan("whole", "host"),) * 31 + (LayerPlan("whole", "device"),)
    p = plan("selective", keep_layers=4, device_gate_up=2, host_gate_up=0.25)
    assert p.layers[28:] == (LayerPlan(),) * 4 and p.recomputed == 28
    assert [lp.gate_up for lp in p.layers[26:28]] == ["device", "device"]
    # 0.25 of 28 spread evenly (layers 2, 6, ..., 26), the last one taken by the device
    assert p.count(gate_up="host") == 6 and p.count(recompute="halves") == 28


def test_the_host_rule_turns_off_qkv_then_attention_then_halves(monkeypatch):
    x = 8 * 2048 * 4096 * 2  # 128 MiB, pinned as it is
    for room, want in ((32 * 4.6 * x, ("auto", True, True)), (32 * 3.6 * x, ("auto", False, True)),
                       (32 * 2.6 * x, ("off", False, True)), (32 * 1.6 * x, ("off", False, False))):
        monkeypatch.setattr(host, "host_bytes", lambda r=room: int(r / host.HOST_SHARE))
        p = plan(host_gate_up=0.0)
        assert (p.keep_attention, p.keep_qkv, p.halves) == want, room / x
    # whole layers: as many inputs on the host as the rule has room for, the trailing rest on the GPU
    monkeypatch.setattr(host, "host_bytes", lambda: int(10.5 * x / host.HOST_SHARE))
    p = plan(host_gate_up=0.0)
    assert p.host_inputs == 10 and [lp.input for lp in p.layers].count("host") == 10
    assert p.layers[9] == LayerPlan("whole", "host") and p.layers[10] == LayerPlan("whole", "device")


def test_plans_are_made_once_per_batch_shape_and_host(big_host, monkeypatch):
    assert plan() is plan()
    assert plan(tokens=4 * 2048) is not plan()
    first = plan()
    monkeypatch.setattr(host, "host_bytes", lambda: 16 * GiB)
    assert plan() is not first and not plan().halves


def test_settings_are_checked_and_normalised():
    assert Checkpointing("on", keep_layers=3, host_gate_up=0.5).keep_layers == 0
    assert Checkpointing("on", host_gate_up=0.5).host_gate_up == 0.0  # only offloading modes keep gate/up
    assert Checkpointing("selective", keep_layers=3, host_gate_up="0.5") == \
        Checkpointing("selective", keep_layers=3, host_gate_up=0.5)
    for bad, match in ((dict(mode="sometimes"), "gradient_checkpointing"),
                       (dict(keep_layers=-1), "keep_layers"), (dict(host_gate_up=1.5), "host_gate_up"),
                       (dict(device_gate_up=-1), "device_gate_up"),
                       (dict(keep_attention="yes"), "keep_attention"),
                       (dict(narrow_keep=(100, 200)), "narrow_keep"), (dict(narrow_keep=(-1,)), "narrow_keep")):
        with pytest.raises(ValueError, match=match):
            Checkpointing(**{"mode": "offload", **bad})
    assert [parse_host_gate_up(v) for v in ("AUTO", " auto", "0.25", "1", "1.5", "x", 0)] == \
        ["auto", "auto", 0.25, 1.0, None, None, 0.0]


def test_the_run_log_line_says_what_each_layer_keeps_and_where(big_host):
    assert plan("off").describe() == "off: every layer keeps its activations"
    assert plan("on").describe() == "on: every layer recomputed, its input on the GPU"
    assert plan(host_gate_up=0.25).describe() == (
        "offload: recompute in halves, layer inputs in pinned host memory; kept: attention output, q, k, v; "
        "gate/up of 1 layers on the GPU; gate/up of 8 layers on the host")
    assert plan("selective", keep_layers=2, keep_attention="off", device_gate_up=0).describe() == (
        "selective: the last 2 of 32 layers keep their activations; recompute in halves, layer inputs in "
        "pinned host memory")


def test_a_narrow_micro_batch_keeps_the_layers_its_width_allows(big_host):
    """`narrow_keep` (k-1 -> the most tokens at which k layers keep their activations): the plan of a
    micro-batch keeps the trailing layers its width allows, at least `keep_layers`; 'on' has no table."""
    shape = ModelShape(layers=4, hidden=64, intermediate=96, heads=4, kv_heads=2, head_dim=16, qk_norm=False)
    s = Checkpointing("offload", narrow_keep=(3000, 1000, 1000, 0))
    assert [s.kept_layers(t) for t in (4000, 3000, 2000, 1000, 10)] == [0, 1, 1, 3, 3]
    plan = plan_memory(shape, s, tokens=1000, span=500, act_bytes=2, fused=True)
    assert [lp.recompute for lp in plan.layers] == ["halves", "none", "none", "none"]
    assert plan.describe().startswith("offload: the last 3 of 4 layers keep their activations")
    assert Checkpointing("selective", keep_layers=2, narrow_keep=(9, 9, 5)).kept_layers(100) == 2
    assert Checkpointing("on", narrow_keep=(3000,)).narrow_keep == ()
