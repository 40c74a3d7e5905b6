"""A run's activation memory: `set_checkpointing` applies cfg.train.gradient_checkpointing and its options to
the model (planning 'selective' from free GPU memory), and `run_estimate` estimates the peak of a step at the
run's shape (batch, max_seq_length, LoRA rank and targets, optimiser, precision, quantisation) from the same
plan the model executes. `api.train` prints both before the first step and puts the estimate next to the
measured peak in the summary.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fasttune.config import ConfigError, RunConfig
from fasttune.memory import pinned
from fasttune.memory.estimate import (
    MemoryEstimate,
    estimate_memory,
    narrow_keep_table,
    plan_keep_layers,
    step_plan,
    weight_bytes,
)
from fasttune.memory.plan import MemoryPlan, ModelShape, pinned_copy_bytes
from fasttune.memory.settings import Checkpointing, parse_host_gate_up

SELECTIVE_HEADROOM = 0.9  # share of the free GPU memory 'selective' plans into (fragmentation, eval)


def auto_checkpointing(device_type: str) -> str:
    """What gradient_checkpointing 'auto' means for our Llama family: 'off' on a CPU (time is the limit
    there, and RAM is usually ample for the models that train on one); 'offload' on a GPU, where the plan
    keeps within the host rule whatever the host's size (recompute in halves where its pinned copies fit,
    else whole layers with as many inputs on the host as fit and the trailing rest on the GPU)."""
    return "offload" if device_type == "cuda" else "off"


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The projections LoRA replaced ('default', 'all-linear' and explicit names all resolve to these)."""
    from fasttune.lora.layer import LoRALinear

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, LoRALinear) and ".layers.0." in name})


def _act_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def run_plan(model: torch.nn.Module, cfg: RunConfig, precision: str) -> MemoryPlan:
    """The plan our Llama model makes for a micro-batch of the run's shape (plain rows of max_seq_length)."""
    return step_plan(model.config, model.model.checkpointing, batch=cfg.train.per_device_train_batch_size,
                     seq=cfg.model.max_seq_length, act_bytes=_act_bytes(precision),
                     use_kernels=bool(getattr(model, "use_kernels", False)))


def _estimate_kwargs(model: torch.nn.Module, cfg: RunConfig, quantization: str | None) -> dict:
    return dict(quantization=quantization, r=cfg.lora.r, targets=lora_targets(model),
                optimizer=cfg.train.optim, use_kernels=bool(getattr(model, "use_kernels", False)))


def run_estimate(model: torch.nn.Module, cfg: RunConfig, device: torch.device, *, precision: str,
                 quantization: str | None) -> MemoryEstimate | None:
    """Peak GPU memory of one step as the model is set up now; None off the GPU or for the generic path
    (the estimate models our Llama family)."""
    from fasttune.models.llama import LlamaForCausalLM

    if device.type != "cuda" or not isinstance(model, LlamaForCausalLM):
        return None
    return estimate_memory(model.config, run_plan(model, cfg, precision),
                           **_estimate_kwargs(model, cfg, quantization))


def plan_selective(model: torch.nn.Module, cfg: RunConfig, device: torch.device, settings: Checkpointing, *,
                   precision: str, quantization: str | None) -> int:
    """keep_layers for 'selective': the memory estimate of a step at batch x max_seq_length kept within
    SELECTIVE_HEADROOM of the GPU memory free now. The frozen weights are already on the GPU (and so not
    in the free memory), so the budget given to the planner adds back the estimate's own weight term."""
    free, _ = torch.cuda.mem_get_info(device)
    act_bytes = _act_bytes(precision)
    budget = int(SELECTIVE_HEADROOM * free) + weight_bytes(model.config, quantization, act_bytes)
    kwargs = _estimate_kwargs(model, cfg, quantization)
    return plan_keep_layers(model.config, settings, batch=cfg.train.per_device_train_batch_size,
                            seq=cfg.model.max_seq_length, budget_bytes=budget, act_bytes=act_bytes, **kwargs)


def reserve_pinned(model: torch.nn.Module, cfg: RunConfig, device: torch.device, precision: str,
                   log: Callable[[str], None] = print) -> None:
    """Pin, before the first step, the host memory a step of the run's shape copies its offloaded tensors
    into (`memory.pinned`), so that no step pins memory whatever its batch width. Pinning tens of GiB
    (long rows) takes seconds: on a GPU the run log says how much before it waits."""
    plan = run_plan(model, cfg, precision)
    if plan.offloads:
        nbytes = pinned_copy_bytes(plan, ModelShape.of(model.config), pinned.ALIGN)
        if device.type == "cuda" and nbytes >= 2**30:
            log(f"  pinning {nbytes / 2**30:.1f} GiB of host memory for the offloaded activations (once)")
        pinned.reserve(device, nbytes)


def describe_narrow(table: tuple[int, ...], keep: int, layers: int) -> str:
    """The run log's line for `Checkpointing.narrow_keep`."""
    most, fewest = table[keep], table[-1]
    every = " (every layer)" if len(table) == layers else ""
    return (f"micro-batches narrower than a full one keep their last layers' activations within its memory: "
            f"{keep + 1} layer{'s' * (keep > 0)} up to {most:,} tokens, {len(table)}{every} up to {fewest:,}")


def set_checkpointing(model: torch.nn.Module, cfg: RunConfig, device: torch.device, *,
                      precision: str = "fp32", quantization: str | None = None,
                      log: Callable[[str], None] = print) -> str:
    """Apply cfg.train.gradient_checkpointing and return what was chosen, for the run log.

    'auto': `auto_checkpointing` for our Llama model, else on for a GPU and off for a CPU.
    'selective' (our Llama model only): the last layers keep their activations, as many as the memory
    estimate fits in the free GPU memory; on the CPU it runs as 'off' and says so.
    """
    from fasttune.models.llama import LlamaForCausalLM

    mode = cfg.train.gradient_checkpointing
    ours = isinstance(model, LlamaForCausalLM)
    if mode == "auto":
        mode = auto_checkpointing(device.type) if ours else "on" if device.type == "cuda" else "off"
    if not ours:
        if mode == "selective":
            raise ConfigError(f"gradient_checkpointing: 'selective' needs fasttune's own Llama-family model; "
                              f"{type(model).__name__} (the generic transformers path) supports on, offload "
                              "or off")
        model.set_gradient_checkpointing(mode)
        return mode
    if mode == "selective" and device.type != "cuda":
        log("  gradient_checkpointing 'selective' plans from free GPU memory; on the CPU every layer keeps "
            "its activations ('off', as 'auto' chooses there)")
        model.set_gradient_checkpointing("off")
        return "off"
    held = dict(device_gate_up=cfg.train.device_gate_up,
                host_gate_up=parse_host_gate_up(cfg.train.host_gate_up))
    keep = 0
    if mode == "selective":  # the plan counts what the recomputed layers hold
        keep = plan_selective(model, cfg, device, Checkpointing(mode, **held), precision=precision,
                              quantization=quantization)
    narrow: tuple[int, ...] = ()
    if cfg.train.keep_narrow and device.type == "cuda":  # TrainConfig.keep_narrow, on by default
        narrow = narrow_keep_table(model.config, Checkpointing(mode, keep, **held),
                                   batch=cfg.train.per_device_train_batch_size, seq=cfg.model.max_seq_length,
                                   act_bytes=_act_bytes(precision),
                                   **_estimate_kwargs(model, cfg, quantization))
    model.set_gradient_checkpointing(mode, keep_layers=keep, narrow_keep=narrow, **held)
    if narrow[keep:]:
        log("  " + describe_narrow(narrow, keep, model.config.num_hidden_layers))
    if mode in ("offload", "selective"):
        reserve_pinned(model, cfg, device, precision, log)
    if mode == "offload":
        return f"offload ({run_plan(model, cfg, precision).placement()})"
    if mode == "selective":
        n = model.config.num_hidden_layers
        return f"selective (the last {keep} of {n} layers keep their activations)"
    return mode
