"""LoRA adapters in the compute dtype, cast once per change of the adapters rather than at every use.

The fused LoRA kernels (`kernels.lora`) run their products in the compute dtype (bf16 under autocast) while
the adapters train in fp32: each projection casts its A and B at each use, 14 small casts per layer per
pass (forward, rerun), ~900 launches a step of an 8B model. Adapters stepped as one flat buffer
(`train.flat_params`) are registered here (`register`); `in_dtype` then hands out a view of one copy of the
whole buffer in the compute dtype, made by one cast and remade only when the adapters change.

When they change: the copy records the buffer's version and each member's (autograd's in-place counters,
which every in-place torch op bumps: an optimizer step on the buffer, `load_state_dict` into a member) and
is remade at the first use after either moved. Writes that bypass those counters (bitsandbytes' optimizers
write through raw pointers) are announced by the flat optimizer, which bumps the buffer's counter after
each step. A member whose storage is no longer the buffer's (its `.data` replaced) is cast as before.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch.utils.weak import WeakIdKeyDictionary


class FlatCopies:
    """Copies of one flat buffer in other dtypes, each with views in its members' shapes."""

    def __init__(self, flat: torch.Tensor, members: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]]
                 ) -> None:
        self.flat = flat
        self.shapes = [m.shape for m in members]
        self.spans = list(spans)
        self.members = [weakref.ref(m) for m in members]
        self.copies: dict[torch.dtype, tuple[torch.Tensor, list[torch.Tensor]]] = {}
        self.versions: dict[torch.dtype, tuple[int, list[int]]] = {}

    def _current(self) -> tuple[int, list[int]]:
        return self.flat._version, [-1 if (m := ref()) is None else m._version for ref in self.members]

    def view(self, i: int, member: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Member i in `dtype`: its view of the buffer's copy, remade first if the buffer or a member has
        changed since it was made (the check alone on the hot path: no grad-mode switch per use)."""
        seen = self.versions.get(dtype)
        if seen is None or seen[0] != self.flat._version or seen[1][i] != member._version:
            self._remake(dtype)
        return self.copies[dtype][1][i]

    def _remake(self, dtype: torch.dtype) -> None:
        with torch.no_grad():
            if dtype not in self.copies:
                buf = torch.empty_like(self.flat, dtype=dtype)
                views = [buf[o:o + n].view(s) for (o, n), s in zip(self.spans, self.shapes)]
                self.copies[dtype] = (buf, views)
            self.copies[dtype][0].copy_(self.flat)  # into the same buffer: its address does not move
        self.versions[dtype] = self._current()

    def refresh(self) -> None:
        """Remake now every copy that a change of the buffer or a member has made stale."""
        for dtype, seen in list(self.versions.items()):
            if seen != self._current():
                self._remake(dtype)


_COPIES: weakref.WeakSet[FlatCopies] = weakref.WeakSet()

# member -> (its buffer's copies, its index, its data pointer when registered); keyed by identity (a tensor's
# == is elementwise)
_MEMBERS = WeakIdKeyDictionary()


def register(flat: torch.Tensor, members: Sequence[torch.Tensor], spans: Sequence[tuple[int, int]]) -> None:
    """`members` are views of `flat` at `spans` (offset, numel): `in_dtype` may hand out their casts from
    one copy of `flat`."""
    copies = FlatCopies(flat, members, spans)
    _COPIES.add(copies)
    for i, m in enumerate(members):
        _MEMBERS[m] = (copies, i, m.data_ptr())


def in_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """t in `dtype`, for reading (never written, no gradient through it): t itself, a view of its flat
    buffer's copy in `dtype` (`register`), or t.to(dtype)."""
    if t.dtype == dtype:
        return t
    entry = _MEMBERS.get(t)
    if entry is not None and entry[2] == t.data_ptr():
        return entry[0].view(entry[1], t, dtype)
    return t.to(dtype)


def refresh_copies() -> None:
    """Remake now every stale copy, as its next use would: a CUDA graph that replays a training step
    (`train.step_graph`) reads the copies at the addresses it recorded and checks no version itself."""
    for copies in list(_COPIES):
        copies.refresh()
