"""Device and mixed-precision choices: which device, which compute dtype, autocast and the fp16 scaler.

`auto` means fp32 on the CPU (bf16 matmuls are slower than fp32 on most CPUs, and exact is cheap
there) and on Apple's mps (bf16 there by name, on macOS 14+), bf16 on GPUs that support it, fp16 with loss
scaling on older GPUs.
"""

from __future__ import annotations

import contextlib

import torch

from fasttune.config import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def mps_available() -> bool:
    """Apple's Metal backend (macOS on Apple silicon)."""
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: str = "auto") -> torch.device:
    """auto: a CUDA GPU, else Apple's mps, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: {name!r} is not a device (auto, cpu, cuda or cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} asked for, but this machine has no CUDA GPU; use --device cpu")
    if device.type == "mps" and not mps_available():
        raise ConfigError(f"device: {name!r} asked for, but this machine has no Apple mps device; "
                          "use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device: {name!r} is not supported (auto, cpu, mps, cuda or cuda:N)")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """'auto' → the best exact-enough choice for the device; an explicit choice is checked."""
    if precision == "auto":
        if device.type != "cuda":  # the CPU and mps: fp32 (bf16 on mps is asked for by name)
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if precision not in DTYPES:
        raise ConfigError(f"precision: {precision!r} is not one of auto, fp32, bf16, fp16")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError(f"precision: fp16 (with loss scaling) needs a CUDA GPU; use bf16 or fp32 on "
                          f"{device.type}")
    if precision == "bf16" and device.type == "mps" and not mps_bf16_supported():
        raise ConfigError("precision: bf16 on mps needs macOS 14 or newer; use fp32")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("precision: this GPU has no bf16 support; use fp16 or fp32")
    return precision


def mps_bf16_supported() -> bool:
    """bf16 tensors on mps need macOS 14 (Sonoma) or newer."""
    check = getattr(torch.backends.mps, "is_macos_or_newer", None)
    return bool(check and check(14, 0))


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """Matmuls in bf16/fp16 while weights, optimizer state and the loss stay fp32; no-op for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 gradients underflow without loss scaling; bf16 has fp32's exponent range and needs none."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)
