"""DDP over a model that recomputes its layers with offloaded inputs on the fused path (the default on a GPU):
the gradients that two gloo ranks reduce equal one process's over the whole batch."""

import gc
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fasttune.lora.apply import apply_lora
from fasttune.memory.settings import Checkpointing
from fasttune.models.llama import LlamaConfig, LlamaForCausalLM


def build(mode: str) -> LlamaForCausalLM:
    torch.manual_seed(0)
    c = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(c, use_kernels=True)
    model.init_weights()
    apply_lora(model, r=4, lora_alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # nonzero B: every adapter tensor has a gradient
            torch.nn.init.normal_(p, std=0.05)
    model.model.checkpointing = Checkpointing(mode=mode, keep_layers=1 if mode == "selective" else 0,
                                              keep_attention="reference" if mode != "off" else "auto")
    return model


def batch() -> torch.Tensor:
    return torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(1))  # (B, T)


def _rank(rank: int, port: int, mode: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from fasttune.train.distributed import Distributed, wrap_ddp

    model = build(mode)
    ddp = wrap_ddp(model, Distributed(rank=rank, world_size=2, local_rank=rank, local_world_size=2,
                                      mode="ddp"))
    x = batch()[2 * rank:2 * rank + 2]  # this rank's half of the batch
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        ddp(x, targets=x).loss_sum.backward()
    if rank == 0:
        torch.save({n: p.grad for n, p in model.named_parameters() if p.grad is not None}, out)
    # DDP's reducer goes before the process group, as when `fasttune train` returns before `shutdown()`:
    # a process group torn down under a live reducer can abort the process at exit ("terminate called
    # without an active exception"). A rank that tears gloo down while its peer still works aborts the peer.
    del ddp, model
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.parametrize("mode", ["offload", "selective"])
def test_ddp_reduces_the_gradients_of_recomputed_layers(tmp_path, mode):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = str(tmp_path / "grads.pt")
    mp.spawn(_rank, args=(port, mode, out), nprocs=2, join=True)
    reduced = torch.load(out, weights_only=True)
    ref = build("off")
    x = batch()
    ref(x, targets=x).loss_sum.backward()
    expected = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    assert reduced.keys() == expected.keys() and len(expected) == 3 * 7 * 2
    for name, g in expected.items():  # DDP averages over the 2 ranks; the reference sums the whole batch
        torch.testing.assert_close(2 * reduced[name], g, rtol=1e-4, atol=1e-6, msg=name)
