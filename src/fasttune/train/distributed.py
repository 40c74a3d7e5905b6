"""Scale-out under torchrun: the process group, DDP or FSDP2, and the few collectives the loop needs.

`torchrun --nproc-per-node N -m fasttune train ...` starts N processes with RANK, WORLD_SIZE, LOCAL_RANK
(and the rendezvous) in their environment; `setup` joins the group it made, NCCL on GPUs and gloo on
CPUs. Without those variables the run is one plain process and nothing here communicates.

    ddp   every rank holds the whole model; DistributedDataParallel all-reduces the trainable (LoRA)
          gradients in buckets, overlapped with the backward. The frozen base and the buffers are left out
          of its start-up broadcast: every rank loads the same weights.
    fsdp  `fully_shard` (FSDP2) on each decoder layer, then on the root: the frozen base and the adapters
          are sharded over the ranks and gathered layer by layer for the forward and the backward, in the
          compute dtype (MixedPrecisionPolicy); gradients are reduce-scattered in fp32.

Both modes see the same global sequence of micro-batches (`data.packing.BatchStream`), and the loop divides
by the trained tokens of the whole window on all ranks, so a run's updates do not depend on the world size.
Rank 0 alone writes; what the ranks exchange for checkpoints and evaluation is in `dist_state`.
"""

from __future__ import annotations

import atexit
import contextlib
import inspect
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from fasttune.config import ConfigError

MODES = ("none", "ddp", "fsdp")
AUTO_FIT = 0.9  # share of one GPU's memory that the estimate of a step may fill for auto to pick DDP


@dataclass
class Distributed:
    """Where this process stands: its rank in the world, and the mode the run trains in.

    `mode` is "none" for one plain process (not launched by torchrun), else "ddp" or "fsdp" (decided once the
    model is loaded, `choose_mode`).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    mode: str = "none"

    restart: int = 0  # torchrun's restart count (--max-restarts): > 0 resumes from the latest checkpoint

    @property
    def launched(self) -> bool:
        return self.mode != "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


SINGLE = Distributed()


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def rank_device(setting: str, local_rank: int) -> torch.device:
    """This rank's device: cuda:LOCAL_RANK for 'auto' (with CUDA) or 'cuda', the CPU for 'cpu'."""
    if setting.startswith("cuda:"):
        raise ConfigError(f"device: {setting!r} names one GPU; under torchrun each rank takes "
                          "cuda:LOCAL_RANK (use auto or cuda, and CUDA_VISIBLE_DEVICES to choose the GPUs)")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if setting == "mps":
        raise ConfigError("device: 'mps' under torchrun is not supported (one Apple GPU); run one process")
    if setting not in ("auto", "cuda"):
        raise ConfigError(f"device: {setting!r} is not supported (auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' asked for, but this machine has no CUDA GPU; use --device cpu")
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(f"LOCAL_RANK {local_rank} has no GPU: this host has {torch.cuda.device_count()}; "
                          "start at most that many processes per node (--nproc-per-node)")
    return torch.device("cuda", local_rank)


def setup(device_setting: str) -> Distributed | None:
    """Join torchrun's process group (once per process); None when not launched by torchrun."""
    if not launched_by_torchrun():
        return None
    env = {k: int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
    device = rank_device(device_setting, env["LOCAL_RANK"])
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {}
        store = _attempt_store(restart, env["WORLD_SIZE"])
        if store is not None:
            kwargs = {"store": store, "rank": env["RANK"], "world_size": env["WORLD_SIZE"]}
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, **kwargs)
        else:
            dist.init_process_group("gloo", **kwargs)
    return Distributed(rank=env["RANK"], world_size=env["WORLD_SIZE"], local_rank=env["LOCAL_RANK"],
                       local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])),
                       device=device, mode="ddp", restart=restart)


def _attempt_store(restart: int, world_size: int) -> dist.Store | None:
    """After a torchrun restart, the agent's store under a prefix of this attempt; None otherwise.

    Under torchrun the ranks meet in the store its agent hosts, and that store outlives a restart: the
    addresses the ranks of the failed attempt published are still in it, and a rank of the new attempt
    that reads one before its owner rewrites it connects to a dead process (gloo gives up after a few
    retries). Keys under a prefix of the attempt cannot be stale."""
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    from datetime import timedelta

    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
                          is_master=False, timeout=timedelta(minutes=10))
    return dist.PrefixStore(f"fasttune/attempt-{restart}", store)


def agree_stop(signal: int | None, d: Distributed) -> int | None:
    """The stop request of any rank, on every rank (the largest signal number), so that all stop at the
    same step: a signal reaches the ranks at different moments."""
    if not d.launched:
        return signal
    t = torch.tensor([signal or 0], dtype=torch.int64, device=d.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t) or None


def barrier(d: Distributed) -> None:
    if d.launched:
        dist.barrier()


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


_LEAVING_AT_EXIT: list[bool] = []


def leave_group_at_exit() -> None:
    """Leave the process group when the interpreter exits (registered once per process). For the notebook
    layer: a script that torchrun runs never calls `shutdown()`, and a group still joined during the
    interpreter's teardown can abort the process there after the work is done. The CLI leaves the group
    itself (`shutdown()`), so a rank of it that dies keeps its own exit code in torchrun's report."""
    if not _LEAVING_AT_EXIT:
        atexit.register(shutdown)
        _LEAVING_AT_EXIT.append(True)


# ---- agreement between ranks ---------------------------------------------------------------------

def _flat_items(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        out.update(_flat_items(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_same_config(config: dict[str, Any], d: Distributed) -> None:
    """ConfigError on every rank when the ranks were given different configurations (flags or YAML);
    `config` is the run's configuration as a (nested) dict."""
    mine = _flat_items(config)
    everyone: list[Any] = [None] * d.world_size
    dist.all_gather_object(everyone, mine)
    for r, theirs in enumerate(everyone):
        for key in sorted(set(mine) | set(theirs)):
            if everyone[0].get(key) != theirs.get(key):
                raise ConfigError(f"{key} differs between ranks ({everyone[0].get(key)!r} on rank 0, "
                                  f"{theirs.get(key)!r} on rank {r}); every rank must run the same job")


def check_launch(cfg: Any, d: Distributed, log: Callable[[str], None]) -> Any:
    """The run configuration `cfg` (a RunConfig) checked for torchrun; after a torchrun restart it resumes.

    ConfigError (on every rank) for configs that differ between ranks, and for what the ranks cannot run in
    step: a preference method (its objectives call the model outside DDP's and FSDP2's forward), and
    auto_batch_size (each rank would split its micro-batches when it alone runs out of memory)."""
    import dataclasses

    check_same_config(cfg.to_dict(), d)
    if cfg.method.method != "sft":
        raise ConfigError(f"method: {cfg.method.method} is not supported under torchrun (its policy and "
                          "reference passes call the model outside DDP's and FSDP2's forward); run it as one "
                          "process")
    if cfg.train.auto_batch_size:
        raise ConfigError("auto_batch_size: under torchrun the ranks would split their micro-batches at "
                          "different steps; set per_device_train_batch_size instead")
    if d.restart and not cfg.train.resume:
        log(f"torchrun restart {d.restart}: the run resumes from its latest checkpoint")
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, resume=True))
    return cfg


def check_resume_batch(saved: dict[str, Any], global_batch_now: int | None, d: Distributed) -> None:
    """ConfigError when a checkpoint's global micro-batch (sequences per micro-batch over all ranks) is not
    this run's: resuming must continue the same global sequence, so it takes the same rows per step."""
    global_batch = saved.get("global_batch")
    if global_batch is None or global_batch_now is None or global_batch == global_batch_now:
        return
    was = f"the checkpoint was written with a global micro-batch of {global_batch} sequences " \
          f"({saved.get('world_size', '?')} ranks x per_device_train_batch_size " \
          f"{global_batch // max(int(saved.get('world_size', 1)), 1)})"
    if global_batch % d.world_size:
        raise ConfigError(f"per_device_train_batch_size: {was}, which {d.world_size} ranks cannot split "
                          "evenly; resume on a number of ranks that divides it")
    raise ConfigError(f"per_device_train_batch_size: {was}; on {d.world_size} ranks set it to "
                      f"{global_batch // d.world_size} to continue the same batches")


# ---- the mode ------------------------------------------------------------------------------------

def choose_mode(setting: str, d: Distributed, estimate: Any, device: torch.device,
                world_size: int) -> tuple[str, str]:
    """('ddp' | 'fsdp', why) for `distributed: auto | ddp | fsdp`; `estimate` is the run's MemoryEstimate
    of one step on one unsharded rank, or None where there is none (off the GPU, the generic path)."""
    del d
    if setting != "auto":
        return setting, f"distributed: {setting}"
    if estimate is None or device.type != "cuda":
        return "ddp", ("auto: no memory estimate here (it models the Llama family on a GPU), so every rank "
                       "keeps a whole copy (DDP)")
    total = torch.cuda.get_device_properties(device).total_memory
    need = estimate.total
    if need <= AUTO_FIT * total:
        return "ddp", (f"auto: the estimate of a step, {need / 2**30:.2f} GiB, fits one GPU "
                       f"({total / 2**30:.1f} GiB), so every rank keeps a whole copy (DDP)")
    return "fsdp", (f"auto: the estimate of a step, {need / 2**30:.2f} GiB, passes {AUTO_FIT:.0%} of one "
                    f"GPU's {total / 2**30:.1f} GiB, so FSDP2 shards the model over {world_size} ranks")


def check_fsdp(quantization: str | None, optim: str, precision: str, family: str = "llama") -> None:
    """What FSDP2 cannot run exactly here is an error, never a silent change."""
    if family != "llama":
        raise ConfigError("distributed: fsdp shards fasttune's own Llama-family model; this architecture "
                          "trains through transformers + PEFT, under distributed: ddp")
    if quantization in ("8bit", "fp8"):
        raise ConfigError(f"load_in_{quantization}: FSDP2 cannot shard this base (its all-gather would cast "
                          "the stored weights); use load_in_4bit or distributed: ddp")
    if optim == "adamw_8bit":
        raise ConfigError("optim: adamw_8bit (bitsandbytes) does not step FSDP2's sharded tensors; use "
                          "adamw_torch (the adapters' state is small) or distributed: ddp")
    if precision == "fp16":
        raise ConfigError("precision: fp16 loss scaling is not supported under FSDP2; use bf16 or "
                          "distributed: ddp")


def start_mode(d: Distributed, model: nn.Module, *, setting: str, estimate: Any, precision: str,
               quantization: str | None, optim: str, family: str, log: Callable[[str], None]) -> None:
    """Decide DDP or FSDP2 (`choose_mode`), say which and why, and shard the model for FSDP2 (before its
    trainable parameters are collected: fully_shard replaces them)."""
    d.mode, why = choose_mode(setting, d, estimate, d.device, d.world_size)
    log(f"  distributed: {d.mode} over {d.world_size} ranks, {d.device.type} "
        f"({'nccl' if d.device.type == 'cuda' else 'gloo'}): {why}")
    if d.mode == "fsdp":
        check_fsdp(quantization, optim, precision, family)
        shard_model(model, d, precision)


def describe_per_rank(estimate: Any, d: Distributed, layers: int, trainable: int) -> str:
    """The run log's line on one rank's GPU memory: what each rank holds, and what sharding saves.

    DDP: the whole estimate on every rank, plus its gradient buckets (a copy of the adapters' fp32
    gradients). FSDP2: 1/world of the frozen weights and of the adapters with their gradients and optimizer
    state, plus two layers gathered whole (the one running and the next, prefetched); activations are per
    rank as before."""
    gib = 2**30
    if d.mode == "ddp":
        buckets = 4 * trainable
        peak = (estimate.total + buckets) / gib
        return (f"per rank (DDP over {d.world_size}): estimated peak {peak:.2f} GiB, a whole copy on each "
                f"rank plus {buckets / gib:.2f} GiB of gradient buckets")
    w = d.world_size
    weights = estimate.weights / w + 2 * estimate.weights / max(layers, 1)
    adapters = estimate.adapters / w
    total = weights + adapters + estimate.activations + estimate.working
    return (f"per rank (FSDP2 over {w}): estimated peak {total / gib:.2f} GiB (weights {weights / gib:.2f}: "
            f"1/{w} of {estimate.weights / gib:.2f} plus 2 layers gathered; adapters and optimizer "
            f"{adapters / gib:.2f}: 1/{w}; activations {estimate.activations / gib:.2f}, working "
            f"{estimate.working / gib:.2f}); sharding saves {(estimate.total - total) / gib:.2f} GiB of the "
            f"{estimate.total / gib:.2f} GiB of a whole copy")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks FSDP2 shards one by one: our Llama's `model.layers`, else the modules whose class
    transformers names in `_no_split_modules`, else the longest ModuleList."""
    inner = getattr(model, "model", None)
    if isinstance(getattr(inner, "layers", None), nn.ModuleList):
        return list(inner.layers)
    names = set()
    for m in model.modules():
        names.update(getattr(m, "_no_split_modules", None) or ())
    found = [m for m in model.modules() if type(m).__name__ in names]
    if found:
        return found
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    return list(max(lists, key=len)) if lists else []


def shard_model(model: nn.Module, d: Distributed, precision: str) -> None:
    """FSDP2 in place: each decoder layer, then the root (embeddings, final norm, head). Parameters are
    gathered in the compute dtype (bf16/fp16; fp32 keeps them as they are) and gradients reduced in fp32.
    Our Llama's layers then recompute through their own call (which gathers their shards), not in halves."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    from fasttune.train.precision import DTYPES

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    param_dtype = None if precision == "fp32" else DTYPES[precision]
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    if param_dtype is not None:
        nf4_storage(model, param_dtype)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
        if hasattr(layer, "halves_allowed"):
            layer.halves_allowed = False  # LayerRecompute calls the layer's branches, bypassing FSDP's hooks
    fully_shard(model, mesh=mesh, mp_policy=policy)


@torch.no_grad()
def nf4_storage(model: nn.Module, dtype: torch.dtype) -> int:
    """Store every bitsandbytes NF4 weight's packed bytes as `dtype` (bitsandbytes' `quant_storage`), so that
    FSDP2's all-gather in the compute dtype moves the bytes unchanged instead of casting them as numbers. The
    same bytes are viewed, nothing is requantised; the quantisation state stays on the module. Returns how
    many weights were converted."""
    n = 0
    for module in model.modules():
        w = getattr(module, "weight", None)
        if type(w).__name__ != "Params4bit" or w.dtype == dtype:
            continue
        from bitsandbytes.nn import Params4bit

        packed = w.data.contiguous().view(torch.uint8).reshape(-1)  # the NF4 bytes, two weights each
        if packed.numel() % dtype.itemsize:
            raise ConfigError(f"an NF4 weight of {packed.numel()} bytes cannot be stored as {dtype} "
                              "for FSDP2")
        data = packed.view(dtype).reshape(-1, 1)  # (bytes / itemsize, 1), as bitsandbytes lays it out
        module.weight = Params4bit(data, requires_grad=False, quant_state=w.quant_state,
                                   blocksize=w.blocksize, compress_statistics=w.compress_statistics,
                                   quant_type=w.quant_type, quant_storage=dtype, module=module,
                                   bnb_quantized=True)
        module.quant_storage = dtype
        n += 1
    return n


def wrap_ddp(model: nn.Module, d: Distributed) -> nn.Module:
    """DistributedDataParallel over the trainable tensors only (call after the optimizer flattened them:
    DDP copies the reduced gradients into each tensor's `.grad`, the flat buffer's views)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen + [n for n, _ in model.named_buffers()])
    # no buffer sync in the forward (RoPE tables and the like are the same on every rank); the newer
    # keyword replaces broadcast_buffers where torch has it
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters \
        else "broadcast_buffers"
    # Recomputed layers rerun whole, through torch's non-reentrant checkpoint: `LayerRecompute` runs each
    # half's backward nested in the outer one, where DDP's first gradient hook would queue the end of its
    # reduction on the inner backward instead of the step's
    for layer in decoder_layers(model):
        if hasattr(layer, "halves_allowed"):
            layer.halves_allowed = False
    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None, **{sync: False})


@contextlib.contextmanager
def no_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """DDP: no gradient all-reduce for this backward unless `sync` (the window's last micro-batch). FSDP2
    reduce-scatters every micro-batch (the adapters' gradients are small) and plain models have nothing."""
    if sync or not hasattr(model, "no_sync"):
        yield
        return
    with model.no_sync():
        yield


# ---- collectives the loop needs ------------------------------------------------------------------

def all_sum(values: Sequence[float], d: Distributed) -> list[float]:
    """Element-wise sum over ranks (float64: token counts stay exact)."""
    if not d.launched:
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=d.device)
    dist.all_reduce(t)
    return t.tolist()
