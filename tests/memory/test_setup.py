"""A run's activation memory: the settings applied to the model, 'selective' planned from free GPU memory,
and the run's estimate read from the plan the model executes."""

from __future__ import annotations

import pytest
import torch

from fasttune.config import RunConfig, apply_overrides
from fasttune.lora.apply import apply_lora
from fasttune.memory import setup
from fasttune.memory.estimate import estimate_memory, layer_saved_bytes, step_plan, weight_bytes
from fasttune.memory.settings import Checkpointing
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM
from fasttune.train.metrics import summary_text

SIZED = {"max_seq_length": 256}


@pytest.fixture(autouse=True)
def reserved(monkeypatch) -> list:
    """The pinned reservations `set_checkpointing` asks for, recorded (these tests name a CUDA device on a
    machine that may have none)."""
    calls = []
    monkeypatch.setattr(setup.pinned, "reserve", lambda device, nbytes: calls.append((device, nbytes)))
    return calls  # a number: 'auto' is resolved from the data when a run starts


def tiny_lora_llama(targets=("default",), layers: int = 6):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=layers, num_attention_heads=4,
                                         num_key_value_heads=2, max_position_embeddings=64))
    apply_lora(model, r=4, lora_alpha=8, target_modules=list(targets))
    return model


def test_the_estimate_uses_the_runs_shape_and_the_models_checkpointing():
    model = tiny_lora_llama(["q_proj", "v_proj", "down_proj"], layers=4)
    cfg = apply_overrides(RunConfig(), {"max_seq_length": 128, "per_device_train_batch_size": 3, "r": 4,
                                        "optim": "adamw_8bit"}, "test")
    assert setup.lora_targets(model) == ["down_proj", "q_proj", "v_proj"]
    assert setup.run_estimate(model, cfg, torch.device("cpu"), precision="fp32", quantization=None) is None
    for mode, keep in [("offload", 0), ("selective", 2), ("on", 0)]:
        model.set_gradient_checkpointing(mode, keep_layers=keep)
        got = setup.run_estimate(model, cfg, torch.device("cuda"), precision="bf16", quantization="4bit")
        plan = step_plan(model.config, Checkpointing(mode, keep_layers=keep), batch=3, seq=128, act_bytes=2,
                         use_kernels=False)
        want = estimate_memory(model.config, plan, quantization="4bit", r=4, optimizer="adamw_8bit",
                               targets=["down_proj", "q_proj", "v_proj"], use_kernels=False)
        assert got == want, mode
    # the estimate changes with what it is told: more kept layers, more memory
    model.set_gradient_checkpointing("selective", keep_layers=4)
    more = setup.run_estimate(model, cfg, torch.device("cuda"), precision="bf16", quantization="4bit")
    assert more.total > want.total


def test_the_summary_puts_the_estimate_next_to_the_measured_peak():
    result = {"steps": 2, "seconds": 1.0, "train_seconds": 1.0, "tokens": 10, "trained_tokens": 5,
              "tokens_per_s": 10.0,
              "first_loss": 2.0, "final_loss": 1.0, "memory_gib": 7.94, "memory_kind": "cuda_max_allocated"}
    assert "7.94 GiB (cuda_max_allocated)" in summary_text(result)
    result["memory_estimate_gib"] = 8.63
    assert "7.94 GiB (cuda_max_allocated; estimated 8.63)" in summary_text(result)


def _record_plans(monkeypatch, answer=None) -> list:
    """Wrap setup.plan_keep_layers: each call's (settings, kwargs) is recorded; `answer` replaces the
    result."""
    calls, real = [], setup.plan_keep_layers

    def plan(config, settings, **kwargs):
        calls.append((settings, kwargs))
        return real(config, settings, **kwargs) if answer is None else answer

    monkeypatch.setattr(setup, "plan_keep_layers", plan)
    return calls


def test_selective_plans_keep_layers_from_free_gpu_memory(monkeypatch):
    """On CUDA the planner gets the run's shape (batch, max_seq_length, r, the adapted projections, optimizer,
    precision) and a budget of the free memory plus the weights already loaded; its answer is applied."""
    calls = _record_plans(monkeypatch)
    cfg = apply_overrides(RunConfig(), {"gradient_checkpointing": "selective", "max_seq_length": 512, "r": 4,
                                        "per_device_train_batch_size": 4, "optim": "adamw_torch"}, "test")
    model = tiny_lora_llama(targets=("q_proj", "v_proj"))
    weights = weight_bytes(model.config, None, 2)
    one_layer = layer_saved_bytes(model.config, 4 * 512, r=4, act_bytes=2, use_kernels=False)
    plan = step_plan(model.config, Checkpointing("selective"), batch=4, seq=512, use_kernels=False)
    base = estimate_memory(model.config, plan, r=4, targets=["q_proj", "v_proj"], optimizer="adamw_torch",
                           use_kernels=False).total
    for free, expected in [(10 * 2**30, 6), (0, 0), (int((base - weights + 2.5 * one_layer) / 0.9), 2)]:
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device, free=free: (free, 80 * 2**30))
        chosen = setup.set_checkpointing(model, cfg, torch.device("cuda"), precision="bf16")
        assert model.gradient_checkpointing == "selective", free
        assert model.model.checkpointing.keep_layers == expected, free
        assert chosen == f"selective (the last {expected} of 6 layers keep their activations)"
    settings, kwargs = calls[-1]
    assert settings == Checkpointing("selective")
    assert kwargs == dict(batch=4, seq=512, budget_bytes=int(0.9 * free) + weights, act_bytes=2,
                          quantization=None, r=4, targets=["q_proj", "v_proj"], optimizer="adamw_torch",
                          use_kernels=False)


def test_selective_plan_counts_what_recomputed_layers_keep_on_the_fused_path(monkeypatch):
    """With kernels on, recomputed layers also keep their attention output and q, k, v: the planner plans
    with the model's settings on the fused path (as the printed estimate does), so the kept layers fit
    beside them."""
    calls = _record_plans(monkeypatch, answer=0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    cfg = apply_overrides(RunConfig(), {**SIZED, "gradient_checkpointing": "selective"}, "test")
    model = tiny_lora_llama()
    model.set_use_kernels(True)
    setup.set_checkpointing(model, cfg, torch.device("cuda"), precision="bf16")
    settings, kwargs = calls[-1]
    assert kwargs["use_kernels"] is True
    plan = step_plan(model.config, settings, batch=kwargs["batch"], seq=kwargs["seq"], use_kernels=True)
    assert plan.halves and plan.keep_attention == "auto" and plan.qkv_share == (4 + 2 * 2) * 8 / 32


def test_device_gate_up_reaches_the_model_and_the_selective_plan(monkeypatch):
    """train.device_gate_up and host_gate_up: set on our Llama in every mode, and counted by the selective
    planner (which runs before the kept layers are set)."""
    calls = _record_plans(monkeypatch, answer=0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (10 * 2**30, 80 * 2**30))
    model = tiny_lora_llama()
    model.set_use_kernels(True)
    for mode in ("offload", "selective"):
        cfg = apply_overrides(RunConfig(), {**SIZED, "gradient_checkpointing": mode, "device_gate_up": 3},
                              "test")
        setup.set_checkpointing(model, cfg, torch.device("cuda"), precision="bf16")
        assert model.gradient_checkpointing == mode and model.model.checkpointing.device_gate_up == 3, mode
    assert calls[-1][0].device_gate_up == 3
    cfg = apply_overrides(RunConfig(), {**SIZED, "gradient_checkpointing": "offload"}, "test")
    setup.set_checkpointing(model, cfg, torch.device("cuda"), precision="bf16")
    assert model.model.checkpointing.device_gate_up == 1  # the default
    assert model.model.checkpointing.host_gate_up == "auto"  # the default, as the YAML's 'AUTO' below
    for value, share in (("0.25", 0.25), (0, 0.0), ("AUTO", "auto")):
        overrides = {**SIZED, "gradient_checkpointing": "selective", "host_gate_up": value}
        cfg = apply_overrides(RunConfig(), overrides, "t")
        setup.set_checkpointing(model, cfg, torch.device("cuda"), precision="bf16")
        assert model.model.checkpointing.host_gate_up == share and calls[-1][0].host_gate_up == share, value


def test_selective_on_the_cpu_runs_without_checkpointing_and_says_so():
    lines: list[str] = []
    model = tiny_lora_llama()
    model.set_gradient_checkpointing("on")
    cfg = apply_overrides(RunConfig(), {**SIZED, "gradient_checkpointing": "selective"}, "test")
    assert setup.set_checkpointing(model, cfg, torch.device("cpu"), log=lines.append) == "off"
    assert model.gradient_checkpointing == "off"
    assert len(lines) == 1 and "'selective'" in lines[0] and "CPU" in lines[0]


def test_auto_checkpointing_offloads_on_a_gpu_however_small_the_host(monkeypatch):
    """'auto' on CUDA: our Llama offloads its layer inputs; where the host has no room for them the plan
    keeps them on the device (`host.host_input_layers`), so a small host does not mean 'on'. On the CPU
    'off'."""
    from fasttune.memory import host

    model = tiny_lora_llama()
    cfg = apply_overrides(RunConfig(), {"max_seq_length": 512, "per_device_train_batch_size": 4}, "test")
    said = {}
    for size in (1 << 40, 1000):
        monkeypatch.setattr(host, "host_bytes", lambda h=size: h)
        said[size] = setup.set_checkpointing(model, cfg, torch.device("cuda"), precision="bf16")
        assert model.gradient_checkpointing == "offload"
    # the run log says where the inputs go (this model runs without the fused kernels: whole layers)
    assert said[1 << 40] == "offload (whole-layer recompute; layer inputs in pinned host memory)"
    assert said[1000] == ("offload (whole-layer recompute; the inputs of 0 of 6 layers in pinned host "
                          "memory, of the last 6 on the GPU: 40% of host memory holds no more)")
    assert setup.set_checkpointing(model, cfg, torch.device("cpu")) == "off"
    assert model.gradient_checkpointing == "off"


@pytest.mark.parametrize("mode", ["offload", "selective", "on"])
def test_offloading_reserves_the_pinned_copies_of_a_step_at_the_runs_shape(reserved, monkeypatch, mode):
    """Offloading modes pin, before the first step, what the plan of batch x max_seq_length copies to the
    host; 'on' keeps every input on the GPU and pins nothing."""
    from fasttune.memory.plan import ModelShape, pinned_copy_bytes

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (0, 80 * 2**30))  # selective keeps 0
    cfg = apply_overrides(RunConfig(), {"gradient_checkpointing": mode, "max_seq_length": 128,
                                        "per_device_train_batch_size": 3}, "test")
    model = tiny_lora_llama()
    setup.set_checkpointing(model, cfg, torch.device("cuda"), precision="bf16")
    if mode == "on":
        assert reserved == []
        return
    plan = step_plan(model.config, model.model.checkpointing, batch=3, seq=128, use_kernels=False)
    want = pinned_copy_bytes(plan, ModelShape.of(model.config), setup.pinned.ALIGN)
    # whole-layer recompute (no kernels): 5 of 6 layers put their input (3 x 128 x 32 bf16 = 6 pages) on the
    # host, the last keeps its own
    assert reserved == [(torch.device("cuda"), want)] and want == 5 * 24_576


@pytest.mark.parametrize("keep_narrow", [True, False])
def test_offload_on_cuda_lets_narrow_micro_batches_keep_layers_and_says_so(keep_narrow):
    """On a GPU the run's offload plan carries the narrow-batch table made from the run's shape and
    estimate options (`keep_narrow`, default on), and the run log says what it allows; off: none."""
    from fasttune.memory.estimate import narrow_keep_table

    cfg = apply_overrides(RunConfig(), {"gradient_checkpointing": "offload", "max_seq_length": 256,
                                        "per_device_train_batch_size": 2, "r": 4, "optim": "adamw_torch",
                                        "keep_narrow": keep_narrow}, "test")
    assert RunConfig().train.keep_narrow is True  # on by default
    model = tiny_lora_llama(targets=("q_proj", "v_proj"))
    said = []
    setup.set_checkpointing(model, cfg, torch.device("cuda"), precision="bf16", log=said.append)
    table = model.model.checkpointing.narrow_keep
    if not keep_narrow:
        assert table == () and said == []
        return
    assert table == narrow_keep_table(model.config, Checkpointing("offload"), batch=2, seq=256, act_bytes=2,
                                      quantization=None, r=4, targets=["q_proj", "v_proj"],
                                      optimizer="adamw_torch", use_kernels=False)
    assert 0 < len(table) and table[0] < 2 * 256
    assert said == ["  " + setup.describe_narrow(table, 0, 6)]
    assert said[0].startswith(f"  micro-batches narrower than a full one keep their last layers' activations "
                              f"within its memory: 1 layer up to {table[0]:,} tokens")


def test_a_pinned_block_of_a_gib_or_more_is_announced_before_it_is_pinned(reserved, monkeypatch):
    """Long rows pin tens of GiB before step 1, which takes seconds: the run log says how much first. Smaller
    blocks pin quickly and are not mentioned."""
    cfg = apply_overrides(RunConfig(), {"gradient_checkpointing": "offload", "max_seq_length": 256,
                                        "per_device_train_batch_size": 2, "r": 4, "optim": "adamw_torch",
                                        "keep_narrow": False}, "test")
    for nbytes, said_size in ((3 * 2**29, "1.5"), (2**30 - 1, None)):
        monkeypatch.setattr(setup, "pinned_copy_bytes", lambda *a, n=nbytes: n)
        said, reserved[:] = [], []
        setup.set_checkpointing(tiny_lora_llama(), cfg, torch.device("cuda"), precision="bf16",
                                log=said.append)
        assert [n for _, n in reserved] == [nbytes]
        pins = [line for line in said if "pinning" in line]
        assert pins == ([f"  pinning {said_size} GiB of host memory for the offloaded activations (once)"]
                        if said_size else [])


@pytest.mark.parametrize("keep_narrow", [True, False])
def test_the_notebook_trainer_plans_offload_from_its_runs_shape_on_a_gpu(reserved, keep_narrow):
    """SFTTrainer.train makes the offload plan that `fasttune train` makes, from its batch size and max
    length: the narrow-batch table (unless keep_narrow is off) and the pinned block; off a GPU it leaves the
    model as get_peft_model set it."""
    import types

    from fasttune.config import LoraConfig, TrainConfig
    from fasttune.memory.estimate import narrow_keep_table
    from fasttune.notebook.trainer import SFTTrainer

    model = tiny_lora_llama()
    model.set_gradient_checkpointing("offload")  # as get_peft_model(use_gradient_checkpointing="unsloth")
    cfg = TrainConfig(gradient_checkpointing="offload", per_device_train_batch_size=2, optim="adamw_torch",
                      keep_narrow=keep_narrow)
    said = []

    def trainer_on(device):
        notebook_model = types.SimpleNamespace(model=model, device=torch.device(device),
                                               lora_config=LoraConfig(r=4, lora_alpha=8),
                                               loaded=types.SimpleNamespace(quantization=None))
        return types.SimpleNamespace(model=notebook_model, _batch_length=lambda: 256)

    SFTTrainer._plan_activation_memory(trainer_on("cpu"), cfg, "bf16", said.append)
    assert model.model.checkpointing.narrow_keep == () and reserved == [] and said == []
    SFTTrainer._plan_activation_memory(trainer_on("cuda"), cfg, "bf16", said.append)
    table = model.model.checkpointing.narrow_keep
    assert model.gradient_checkpointing == "offload" and len(reserved) == 1
    if not keep_narrow:
        assert table == () and said == []
        return
    assert table == narrow_keep_table(model.config, Checkpointing("offload"), batch=2, seq=256, act_bytes=2,
                                      quantization=None, r=4, targets=setup.lora_targets(model),
                                      optimizer="adamw_torch", use_kernels=False)
    assert table and said == ["  " + setup.describe_narrow(table, 0, 6)]
