"""The optimiser and the learning-rate schedule, built from TrainConfig.

Weight decay is applied to the trainable matrices, not to biases and norm weights (the one-dimensional
tensors), as transformers' Trainer exempts them. With LoRA only the `lora_A`/`lora_B` matrices usually
train (`bias: none`, no norm in `modules_to_save`), so one parameter group serves them all. That is what lets
the optimiser step them as one flat buffer (`fasttune.train.flat_params`): one launch per step instead of a
few per adapter tensor.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from fasttune.config import ConfigError, TrainConfig
from fasttune.train.flat_params import can_flatten, flat_optimizer


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over `params`: torch's (fused on CUDA) or bitsandbytes' 8-bit one (CUDA only).

    Two or more trainable tensors are moved into one flat buffer per device and dtype first
    (`flat_params.flat_optimizer`): they stay the model's Parameters, now views of the buffer, and the
    optimiser's `param_groups` hold the buffers. Its `zero_grad` always zeroes in place.
    """
    params = list({id(p): p for p in params if p.requires_grad}.values())
    if not params:
        raise ConfigError("nothing to train: the model has no trainable parameters (check target_modules)")
    if not isinstance(cfg.learning_rate, float | int):  # 'auto' is resolved from the model (train/auto.py)
        raise ConfigError(f"learning_rate: build_optimizer needs a number, got {cfg.learning_rate!r} "
                          "('auto' is chosen by fasttune.train from the loaded model)")
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon,
                  weight_decay=cfg.weight_decay)
    on_cuda = all(p.is_cuda for p in params)
    if cfg.optim == "adamw_torch":
        # The fused kernel is one launch per step (over the flat buffer); it needs every parameter on
        # CUDA in a floating dtype.
        cls, kwargs = torch.optim.AdamW, {**kwargs, "fused": on_cuda or None}
    elif cfg.optim == "adamw_8bit":
        if not on_cuda:
            raise ConfigError("adamw_8bit needs a CUDA GPU (bitsandbytes); use --optim adamw_torch")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError("adamw_8bit needs bitsandbytes: pip install 'fasttune[gpu]'") from None
        cls = bnb.optim.AdamW8bit
    else:
        raise ConfigError(f"optim: unknown optimiser {cfg.optim!r} (adamw_torch or adamw_8bit)")
    exempt = [p for p in params if p.dim() < 2] if cfg.weight_decay else []
    if exempt:  # two groups (not flattened): the biases and norm weights without weight decay
        ids = {id(p) for p in exempt}
        groups = [{"params": [p for p in params if id(p) not in ids]},
                  {"params": exempt, "weight_decay": 0.0}]
        return cls([g for g in groups if g["params"]], **kwargs)
    if len(params) > 1 and can_flatten(params):
        return flat_optimizer(cls, params, **kwargs)
    return cls(params, **kwargs)


def warmup_steps_for(cfg: TrainConfig, total_steps: int) -> int:
    """warmup_steps if set, else warmup_ratio of all steps (rounded up, as transformers does)."""
    if cfg.warmup_steps > 0:
        return cfg.warmup_steps
    return math.ceil(cfg.warmup_ratio * total_steps)


def lr_factor(step: int, kind: str, warmup: int, total: int) -> float:
    """Multiplier on the peak lr for the update made at optimiser step `step` (0-based).

    Warmup rises linearly from 0 (step 0 trains with lr 0 when warmup > 0, as in transformers);
    then linear decays to 0 at `total`, cosine follows half a cosine to 0, constant stays at 1.
    """
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    progress = min(max(progress, 0.0), 1.0)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ConfigError(f"lr_scheduler_type: unknown schedule {kind!r} (linear, cosine or constant)")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepping once per optimiser step; its state_dict is plain numbers (safe to save)."""
    warmup = warmup_steps_for(cfg, total_steps)
    kind = cfg.lr_scheduler_type
    lr_factor(warmup, kind, warmup, total_steps)  # rejects an unknown kind now, not at the first step
    return torch.optim.lr_scheduler.LambdaLR(optimizer,
                                             lambda step: lr_factor(step, kind, warmup, total_steps))
