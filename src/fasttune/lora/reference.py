"""The reference policy of the preference and RL losses, without a second copy of the model's weights.

Either the base alone (every adapter switched off), or the adapter as it was when training started
(`init_from` a finished SFT run): its starting values are kept aside (adapter-sized, megabytes) and copied
into the trainable tensors for the reference's no-grad forward, then the current values are put back.
The reference forward must therefore run before the policy forward whose graph reads the adapter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from fasttune.lora.layer import LoRALinear


@contextlib.contextmanager
def adapters_off(model: nn.Module) -> Iterator[None]:
    """Run `model` as its base: our LoRALinear layers skip their adapter, a PEFT model disables its own."""
    hf = getattr(model, "hf_model", None)
    if hf is not None and hasattr(hf, "disable_adapter"):  # the generic transformers + PEFT path
        with hf.disable_adapter():
            yield
        return
    layers = [m for m in model.modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("adapters_off: the model has no LoRA adapters to switch off")
    for m in layers:
        m.disabled = True
    try:
        yield
    finally:
        for m in layers:
            m.disabled = False


class Reference:
    """`with reference(model):` runs the reference policy.

    `start` None: the base with the adapters off. Otherwise {name: tensor} of the trainable parameters'
    starting values (names as in `params`), swapped in for the duration of the block.
    """

    def __init__(self, params: dict[str, torch.nn.Parameter], start: dict[str, torch.Tensor] | None = None):
        self.params = params
        self.start = None if start is None else {k: v.detach().clone() for k, v in start.items()}
        if self.start is not None and set(self.start) != set(params):
            differ = sorted(set(self.start) ^ set(params))[:3]
            raise ValueError(f"reference adapter does not match the trainable tensors (differs in {differ})")

    @contextlib.contextmanager
    def __call__(self, model: nn.Module) -> Iterator[None]:
        if self.start is None:
            with adapters_off(model):
                yield
            return
        with torch.no_grad():
            current = {k: p.detach().clone() for k, p in self.params.items()}
            for k, p in self.params.items():
                p.copy_(self.start[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(current[k])
