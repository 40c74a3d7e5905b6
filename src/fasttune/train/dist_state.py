"""What the ranks of a torchrun job exchange around training: whole tensors gathered from FSDP2's shards,
checkpoint state written in one form for any mode and world size, every rank's random generators, rank 0's
checkpoint handed to the others, and each rank's share of the eval batches.

A checkpoint written under any mode on any number of ranks holds the adapter whole, the optimizer state
whole (one flat buffer from DDP or one process, per tensor from FSDP2; each loads into the other), and the
generators of every rank under `rng["ranks"]` (rank 0's also at the top level, as one process saves them).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from fasttune.train.distributed import Distributed


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective: every rank calls it), else `t` itself."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def full_adapter(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every trainable tensor whole, on the CPU (on every rank: gathering is collective)."""
    return {n: full_tensor(p.detach()).cpu() for n, p in params.items()}


def gathered_adapter(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The trainable tensors whole when they are FSDP2 shards (a collective), else None (read them as they
    are)."""
    from torch.distributed.tensor import DTensor

    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    return full_adapter(params) if any(isinstance(p, DTensor) for p in params.values()) else None


def is_main_process() -> bool:
    """Rank 0 of an initialised process group, or a process without one: the one that writes files."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


@torch.no_grad()
def load_full(p: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy a whole tensor into `p`, or into this rank's shard of it."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(p, DTensor):
        shard = distribute_tensor(whole.to(p.device, p.dtype), p.device_mesh, p.placements,
                                  src_data_rank=None)  # every rank has `whole`: slice, no communication
        p.to_local().copy_(shard.to_local())
    else:
        p.copy_(whole)


class FullState:
    """What `save_checkpoint` saves as the optimizer: a state dict made whole beforehand (FSDP2)."""

    def __init__(self, state: dict[str, Any]) -> None:
        self._state = state

    def state_dict(self) -> dict[str, Any]:
        return self._state


def optimizer_state(optimizer: torch.optim.Optimizer, d: Distributed) -> Any:
    """The optimizer, or under FSDP2 its state with every shard made whole (per tensor, in the order of the
    trainable tensors: one process's flat optimizer loads it, `flat_params._flat_state`)."""
    if d.mode != "fsdp":
        return optimizer
    sd = optimizer.state_dict()
    state = {i: {k: full_tensor(v).cpu() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
             for i, s in sd["state"].items()}
    return FullState({"state": state, "param_groups": sd["param_groups"]})


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any],
                         params: Sequence[torch.Tensor], d: Distributed) -> None:
    """Load a checkpoint's optimizer state written in any mode on any world size."""
    if d.mode != "fsdp":
        optimizer.load_state_dict(state)
        return
    from torch.distributed.tensor import DTensor, distribute_tensor

    from fasttune.train.flat_params import per_tensor_state

    state = per_tensor_state(state, [p.shape for p in params])
    sharded = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        sharded[i] = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                      if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape else v
                      for k, v in s.items()}
    optimizer.load_state_dict({"state": sharded, "param_groups": state["param_groups"]})


def gather_rng(states: dict[str, Any], d: Distributed) -> dict[str, Any]:
    """Rank 0's generator states with every rank's under "ranks" (what a checkpoint saves)."""
    if not d.launched:
        return states
    everyone: list[Any] = [None] * d.world_size
    dist.all_gather_object(everyone, states)
    return {**everyone[0], "ranks": everyone}


def rank_rng(saved: dict[str, Any], d: Distributed) -> dict[str, Any] | None:
    """This rank's saved generator states; None for a rank the checkpoint had not (more ranks than it was
    written with): that rank seeds its own from (seed, rank, step)."""
    ranks = saved.get("ranks")
    if ranks is None:
        return saved if d.rank == 0 else None
    return ranks[d.rank] if d.rank < len(ranks) else None


def fresh_seed(seed: int, rank: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0])


def from_rank0(fn: Callable[[], Any], d: Distributed) -> Any:
    """`fn()` run on rank 0, its result (or the exception it raised) handed to every rank: rank 0 reads the
    checkpoint, and the others need not see its files."""
    if not d.launched:
        return fn()
    box: list[Any] = [None]
    if d.is_main:
        try:
            box = [("ok", fn())]
        except Exception as e:  # noqa: BLE001  raised again below, on every rank
            box = [("error", e)]
    dist.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def restore_ranks(ckpt: Any, params: dict[str, torch.nn.Parameter], optimizer: torch.optim.Optimizer,
                  scheduler: Any, scaler: Any | None, batches: Any, d: Distributed, seed: int) -> None:
    """`train.resume.restore` on each rank of any world size: whole tensors into this rank's shards, the
    optimizer state in this mode's layout, this rank's generators (or, for a rank the checkpoint had not,
    its own seeded from (seed, rank, step)), the global data position."""
    from fasttune.run_dir import RunDirError
    from fasttune.train.checkpoint import set_rng_states
    from fasttune.train.loop import seed_everything

    differs = set(params) ^ set(ckpt.adapter)
    if differs:
        raise RunDirError(f"checkpoint {ckpt.path} does not match the model's trainable tensors "
                          f"(differs in {sorted(differs)[:3]}...): was the LoRA configuration changed?")
    for name, p in params.items():
        load_full(p, ckpt.adapter[name])
    load_optimizer_state(optimizer, ckpt.optimizer, list(params.values()), d)
    scheduler.load_state_dict(ckpt.scheduler)
    if scaler is not None and ckpt.scaler is not None:
        scaler.load_state_dict(ckpt.scaler)
    states = rank_rng(ckpt.rng, d)
    if states is not None:
        set_rng_states(states)
    else:
        seed_everything(fresh_seed(seed, d.rank, int(ckpt.state["step"])))
    batches.load_state_dict(ckpt.state["data_state"])


def eval_share(batches: Sequence[dict[str, torch.Tensor]], d: Distributed) -> list[dict[str, torch.Tensor]]:
    """This rank's eval batches: every world_size-th one, topped up with nothing-to-score copies so that
    every rank runs as many forwards (FSDP2's gathers are collective)."""
    batches = list(batches)
    if not d.launched or not batches:
        return batches
    mine = batches[d.rank::d.world_size]
    per_rank = -(-len(batches) // d.world_size)
    filler = {k: v[:1].clone() for k, v in batches[0].items()}
    filler["targets"].fill_(-100)
    return mine + [filler] * (per_rank - len(mine))
