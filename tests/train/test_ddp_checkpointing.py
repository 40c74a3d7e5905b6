"""Under DDP, checkpointing modes whose layers recompute in halves on the fused path are refused by name
(DDP's reducer cannot take a gradient accumulated twice in one backward), and 'auto' picks 'on' under
torchrun."""

import pytest
import torch
import torch.distributed as dist

from fasttune.config import ConfigError, RunConfig
from fasttune.lora.apply import apply_lora
from fasttune.memory.settings import Checkpointing
from fasttune.memory.setup import set_checkpointing
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM
from fasttune.train.distributed import Distributed, wrap_ddp


def tiny(use_kernels: bool) -> LlamaForCausalLM:
    c = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(c, use_kernels=use_kernels)
    apply_lora(model, r=4, lora_alpha=8)
    return model


@pytest.fixture
def one_rank(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    yield Distributed(mode="ddp")
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["offload", "selective"])
def test_ddp_refuses_layers_recomputed_in_halves(one_rank, mode):
    model = tiny(use_kernels=True)
    model.model.checkpointing = Checkpointing(mode=mode, keep_layers=1 if mode == "selective" else 0)
    match = f"gradient_checkpointing: '{mode}'.*use gradient_checkpointing: on"
    with pytest.raises(ConfigError, match=match):
        wrap_ddp(model, one_rank)


def test_ddp_takes_whole_layer_recompute_and_the_reference_path(one_rank):
    for use_kernels, mode in ((True, "on"), (False, "offload")):
        model = tiny(use_kernels)
        model.model.checkpointing = Checkpointing(mode=mode)
        ddp = wrap_ddp(model, one_rank)
        x = torch.randint(0, 64, (2, 8))
        ddp(x, targets=x).loss_sum.backward()  # the reducer accepts every gradient once
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_auto_is_on_under_torchrun(monkeypatch):
    monkeypatch.setattr("fasttune.memory.setup.auto_checkpointing", lambda device_type: "offload")
    cfg = RunConfig()
    lines = []
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert set_checkpointing(tiny(False), cfg, torch.device("cpu"), log=lines.append) == "on"
    assert "'on' under torchrun" in lines[0]
