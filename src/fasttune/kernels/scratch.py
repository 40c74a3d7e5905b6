"""Scratch tensors that kernels reuse from call to call (one dense copy of one weight at a time, for example),
and their release where a training step peaks.

A `Scratch` keeps one flat tensor per key, grown to the largest request. `release_scratch()` lets every
scratch tensor go: the memory returns to the allocator once no view of it is alive, and the next request
makes it again at the size it had reached, so it does not grow back step by step. The model calls it before
its loss, the peak of a training step, where no dequantised weight is in use. Once decoding captures a CUDA
graph (`keep_scratch`), they are kept for good.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

_ALL: list[Scratch] = []
_kept = False  # set for good once a CUDA graph may have recorded a scratch tensor's address


class Scratch:
    def __init__(self) -> None:
        self._tensors: dict[Hashable, torch.Tensor] = {}
        self._sizes: dict[Hashable, int] = {}  # the size each key had reached before a release
        _ALL.append(self)

    def get(self, key: Hashable, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A flat tensor of `numel` elements, shared by the callers of this key, valid until its next call."""
        buf = self._tensors.get(key)
        if buf is None or buf.numel() < numel:
            size = max(numel, self._sizes.get(key, 0))
            buf = self._tensors[key] = torch.empty(size, dtype=dtype, device=device)
        return buf[:numel]

    def release(self) -> None:
        for key, buf in self._tensors.items():
            self._sizes[key] = max(self._sizes.get(key, 0), buf.numel())
        self._tensors.clear()

    def held(self) -> int:
        """Bytes this scratch holds now."""
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


def release_scratch() -> None:
    """Let every kernel's scratch tensor go (see the module docstring); nothing after `keep_scratch`."""
    if _kept:
        return
    for s in _ALL:
        s.release()


def keep_scratch() -> None:
    """Never release scratch tensors from now on in this process: a CUDA graph (decoding's) replays kernels
    that write them at the addresses it recorded, which a release would hand to other tensors."""
    global _kept
    _kept = True
