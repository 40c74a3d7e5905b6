"""The memory estimate of a run (`fasttune.models.memory`) fed with the run's own shape: batch,
max_seq_length, LoRA rank and targets, optimiser, precision, quantisation, and the checkpointing the
model was set to.

`api.train` prints it before the first step and puts it next to the measured peak in the summary;
'selective' checkpointing plans its kept layers with it.
"""

from __future__ import annotations

import torch

from fasttune.config import RunConfig
from fasttune.models.memory import MemoryEstimate

SELECTIVE_HEADROOM = 0.9  # share of the free GPU memory 'selective' plans into (fragmentation, eval)


def lora_targets(model: torch.nn.Module) -> list[str]:
    """The projections LoRA replaced ('default', 'all-linear' and explicit names all resolve to these)."""
    from fasttune.lora.layer import LoRALinear

    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                   if isinstance(m, LoRALinear) and ".layers.0." in name})


def _shape_kwargs(model: torch.nn.Module, cfg: RunConfig, precision: str, quantization: str | None) -> dict:
    return dict(batch=cfg.train.per_device_train_batch_size, seq=cfg.model.max_seq_length,
                quantization=quantization, r=cfg.lora.r, targets=lora_targets(model),
                optimizer=cfg.train.optim, act_bytes=4 if precision == "fp32" else 2,
                use_kernels=bool(getattr(model, "use_kernels", False)))


def run_estimate(model: torch.nn.Module, cfg: RunConfig, device: torch.device, *, precision: str,
                 quantization: str | None) -> MemoryEstimate | None:
    """Peak GPU memory of one step as the model is set up now; None off the GPU or for the generic path
    (the estimate models our Llama family)."""
    from fasttune.models.llama import LlamaForCausalLM
    from fasttune.models.memory import estimate_memory

    if device.type != "cuda" or not isinstance(model, LlamaForCausalLM):
        return None
    return estimate_memory(model.config, checkpointing=model.gradient_checkpointing,
                           keep_layers=model.model.keep_layers, **_kept_kwargs(model),
                           **_shape_kwargs(model, cfg, precision, quantization))


def _kept_kwargs(model: torch.nn.Module) -> dict:
    """What the offloading modes keep per recomputed layer besides its inputs (attention output, q/k/v, the
    last layers' gate/up on the device, and gate/up on the host): only on the fused kernel path, the one that
    recomputes in halves."""
    if not getattr(model, "use_kernels", False):
        return {}
    return dict(kept_attention=model.model.keep_attention != "off", kept_qkv=model.model.kept_qkv_share(),
                device_gate_up=model.model.device_gate_up, host_gate_up=model.model.host_gate_up)


def plan_selective(model: torch.nn.Module, cfg: RunConfig, device: torch.device, *, precision: str,
                   quantization: str | None) -> int:
    """keep_layers for 'selective': the memory estimate of a step at batch x max_seq_length kept within
    SELECTIVE_HEADROOM of the GPU memory free now. The frozen weights are already on the GPU (and so not
    in the free memory), so the budget given to the planner adds back the estimate's own weight term."""
    from fasttune.models.memory import plan_keep_layers, weight_bytes

    free, _ = torch.cuda.mem_get_info(device)
    kwargs = _shape_kwargs(model, cfg, precision, quantization)
    budget = int(SELECTIVE_HEADROOM * free) + weight_bytes(model.config, quantization, kwargs["act_bytes"])
    kwargs.update(_kept_kwargs(model))  # the recomputed layers' kept tensors count against the budget too
    return plan_keep_layers(model.config, budget_bytes=budget, **kwargs)
