"""Trainable tensors as views of one flat buffer, their gradients as views of one gradient buffer, and an
optimizer that steps the buffer as a single parameter.

Why: LoRA on 7 projections x 32 layers is 448 small tensors, and an optimizer launches a few kernels per
tensor, so the step is bound by launches. Over one flat buffer the step is one (fused) launch whatever the
number of adapters.

Layout, for members A (2, 3) and B (4,) with an alignment of 8 elements (the real one is `ALIGN`):
```
param        A00 A01 A02 A10 A11 A12  0   0  | B0  B1  B2  B3  0   0   0   0      (16,)
param.grad   dA  ...                  0   0  | dB  ...         0   0   0   0      (16,)
A.data = param[0:6].view(2, 3)    A.grad = param.grad[0:6].view(2, 3)
B.data = param[8:12]              B.grad = param.grad[8:12]
```
Autograd accumulates into an existing `.grad` in place (`grad += new`, outside create_graph), so backward
through the model fills the flat gradient buffer directly; so do the fused LoRA kernels (they return their
gradients through autograd) and `LayerRecompute` (its inner backward accumulates into `.grad`). The padding
stays zero: its gradient is zero, so Adam's moments and update there are zero, and weight decay keeps 0 at 0.

The one rule: a member's `.grad` must never be set to None, or the next backward allocates a fresh tensor
beside the buffer. The optimizer from `flat_optimizer` therefore zeroes in place whatever `set_to_none`
says, and before each step re-points any member whose `.grad` was replaced (copying that gradient in).
Its state dict holds one parameter per buffer; a per-tensor AdamW state (a checkpoint written before the
buffer existed) is moved into the buffer's layout when loaded.

8-bit AdamW (bitsandbytes) over the flat buffer runs the same algorithm; what changes is where its
quantisation blocks fall. It quantises the two moments in blocks of 256 values, each block scaled by its own
absmax. Per tensor, blocks start at each tensor's first element; over the buffer they follow the buffer,
so a block could straddle two tensors and share one scale between them. `ALIGN` = 256 starts every member
on a block boundary, so each block still holds one tensor's values (plus zero padding, which leaves the
absmax unchanged): the quantisation matches per-tensor blocking. One difference remains: per tensor,
bitsandbytes keeps 32-bit moments for tensors under `min_8bit_size` (4,096 values); the buffer is one large
tensor, so every adapter gets 8-bit moments (LoRA A/B of a 7B model are 65,536+ values: 8-bit either way).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fasttune.kernels import adapter_cast

# Members start at multiples of this many elements: bitsandbytes' 8-bit block size (see above), and
# 1 KiB for fp32, so every member is as aligned as a tensor of its own (kernels, TMA, vector loads).
ALIGN = 256


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class FlatParams:
    """Members of one device and dtype, moved into one flat Parameter `param` (their values are kept).

    After construction each member's `.data` is a contiguous view of `param` and its `.grad` a view of
    `param.grad`; the members stay the model's Parameters (names, state dicts and hooks are unchanged).
    """

    def __init__(self, members: Sequence[nn.Parameter]) -> None:
        if not members:
            raise ValueError("FlatParams: no parameters")
        dtype, device = members[0].dtype, members[0].device
        if any(p.dtype != dtype or p.device != device for p in members):
            raise ValueError("FlatParams: members must share one device and dtype (see flatten_params)")
        self.members = list(members)
        self.spans: list[tuple[int, int]] = []  # (offset, numel) of each member in the buffer
        total = 0
        for p in self.members:
            self.spans.append((total, p.numel()))
            total += _round_up(p.numel(), ALIGN)
        buffer = torch.zeros(total, dtype=dtype, device=device)  # (total,) zero padding between members
        with torch.no_grad():
            for p, view in zip(self.members, self._views_of(buffer)):
                view.copy_(p)
                p.data = view  # the Parameter object stays; its storage is now the buffer
        self.param = nn.Parameter(buffer)
        adapter_cast.register(self.param, self.members, self.spans)  # one cast of the buffer per update
        self._grad: torch.Tensor | None = None  # the gradient buffer the views below belong to
        self._grad_views: list[torch.Tensor] = []
        self.bind_grads()

    def _views_of(self, buffer: torch.Tensor) -> list[torch.Tensor]:
        return [buffer[off:off + n].view(p.shape) for p, (off, n) in zip(self.members, self.spans)]

    @torch.no_grad()
    def bind_grads(self) -> None:
        """Make `param.grad` the gradient buffer and each member's `.grad` its view of it.

        Cheap when nothing changed (one identity check per member). A member gradient that is not its view
        (assigned by hand, or created by a backward after someone set it to None) is copied in; a view of a
        buffer that `param.grad = None` dropped is discarded, as that assignment meant.
        """
        if self.param.grad is None:
            self.param.grad = torch.zeros_like(self.param)
        stale: list[torch.Tensor | None] = [None] * len(self.members)
        if self.param.grad is not self._grad:
            stale = self._grad_views or stale
            self._grad = self.param.grad
            self._grad_views = self._views_of(self._grad)
        for p, view, old in zip(self.members, self._grad_views, stale):
            g = p.grad
            if g is view:
                continue
            if g is not None and g is not old:
                view.copy_(g)
            p.grad = view

    @torch.no_grad()
    def zero_grad(self) -> None:
        """Zero the gradient buffer in place (one kernel), keeping every member's view of it."""
        self.bind_grads()
        self._grad.zero_()


def _overlap(params: Sequence[torch.Tensor]) -> bool:
    """Whether any two tensors share memory (tied weights): flattening would untie them."""
    spans = []
    for p in params:
        extent = sum((size - 1) * stride for size, stride in zip(p.shape, p.stride())) + 1
        spans.append((p.device, p.data_ptr(), p.data_ptr() + extent * p.element_size()))
    spans.sort(key=lambda s: (str(s[0]), s[1]))
    return any(a[0] == b[0] and b[1] < a[2] for a, b in zip(spans, spans[1:]) if a[1] != a[2])


def can_flatten(params: Sequence[nn.Parameter]) -> bool:
    """Plain dense floating tensors that share no memory (true of LoRA adapters)."""
    return all(type(p.data) is torch.Tensor and p.layout == torch.strided and p.is_floating_point()
               and p.numel() > 0 for p in params) and not _overlap(params)


def flatten_params(params: Iterable[nn.Parameter]) -> list[FlatParams]:
    """One FlatParams per (device, dtype) of `params`, in order of first appearance."""
    groups: dict[tuple[torch.device, torch.dtype], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            groups.setdefault((p.device, p.dtype), []).append(p)
    return [FlatParams(members) for members in groups.values()]


class _FlatStep:
    """Mixed in before an optimizer class: it steps `flat_groups`' buffers and zeroes their gradients in
    place (`set_to_none` would cut the members' gradient views loose from the buffer)."""

    flat_groups: list[FlatParams]

    def __init__(self, flat_groups: list[FlatParams], *args: Any, **kwargs: Any) -> None:
        super().__init__([g.param for g in flat_groups], *args, **kwargs)
        self.flat_groups = flat_groups
        self.register_step_pre_hook(_bind_before_step)
        self.register_step_post_hook(_announce_step)

    def zero_grad(self, set_to_none: bool = True) -> None:
        del set_to_none  # always in place: see the class docstring
        for group in self.flat_groups:
            group.zero_grad()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(_flat_state(state_dict, self.flat_groups))


_ADAMW_STATE = {"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"}  # torch.optim.AdamW's per-tensor state


def _flat_state(state_dict: dict[str, Any], groups: list[FlatParams]) -> dict[str, Any]:
    """`state_dict` in the flat layout if torch's AdamW saved it per tensor (a checkpoint written before
    adapters were stepped as one buffer); otherwise unchanged. Each moment goes to its member's span."""
    saved = state_dict["param_groups"]
    n_members = len(groups[0].members)
    if len(groups) != 1 or len(saved) != 1 or n_members < 2 or len(saved[0]["params"]) != n_members:
        return state_dict  # already flat (or not ours to convert): torch checks it as usual
    group = groups[0]
    per_tensor = [state_dict["state"].get(i, {}) for i in saved[0]["params"]]
    keys = set(per_tensor[0])
    same_steps = len({float(s.get("step", -1)) for s in per_tensor}) == 1
    if not keys <= _ADAMW_STATE or not same_steps or any(set(s) != keys for s in per_tensor):
        raise ValueError("the optimizer state was saved per tensor in a form that cannot be moved into one "
                         "flat buffer (8-bit state, or tensors stepped unequally); start the run again "
                         "without --resume")
    merged: dict[str, Any] = {}
    for key in sorted(keys):
        values = [s[key] for s in per_tensor]
        if key == "step":  # one count for all; cloned, as the optimizer increments it in place
            merged[key] = values[0].clone() if isinstance(values[0], torch.Tensor) else values[0]
            continue
        buf = torch.zeros(group.param.shape, dtype=values[0].dtype, device=values[0].device)
        for v, (off, n) in zip(values, group.spans):
            buf[off:off + n] = v.reshape(-1)
        merged[key] = buf
    return {"state": {0: merged} if merged else {}, "param_groups": [{**saved[0], "params": [0]}]}


def per_tensor_state(state_dict: dict[str, Any], shapes: Sequence[torch.Size]) -> dict[str, Any]:
    """The inverse of `_flat_state`: an optimizer state saved over one flat buffer whose members had
    `shapes` (in order), as per-tensor state (what an optimizer over the members themselves loads, e.g.
    FSDP2's sharded adapters). A state already per tensor is returned unchanged."""
    saved = state_dict["param_groups"]
    if len(saved) != 1 or len(saved[0]["params"]) == len(shapes):
        return state_dict
    if len(saved[0]["params"]) != 1:
        raise ValueError(f"the optimizer state holds {len(saved[0]['params'])} tensors, neither one flat "
                         f"buffer nor the {len(shapes)} trainable tensors; was the LoRA configuration "
                         "changed?")
    flat = state_dict["state"].get(saved[0]["params"][0], {})
    spans, offset = [], 0
    for shape in shapes:
        n = torch.Size(shape).numel()
        spans.append((offset, n, shape))
        offset += _round_up(n, ALIGN)
    state: dict[int, dict[str, Any]] = {}
    for i, (off, n, shape) in enumerate(spans):
        member = {}
        for key, value in flat.items():
            if isinstance(value, torch.Tensor) and value.dim() == 1 and value.numel() == offset:
                member[key] = value[off:off + n].reshape(shape).clone()
            else:  # the step count: one for all
                member[key] = value.clone() if isinstance(value, torch.Tensor) else value
        state[i] = member
    groups = [{**saved[0], "params": list(range(len(shapes)))}]
    return {"state": state if flat else {}, "param_groups": groups}


def _bind_before_step(optimizer: _FlatStep, args: Any, kwargs: Any) -> None:
    for group in optimizer.flat_groups:
        group.bind_grads()


def _announce_step(optimizer: _FlatStep, args: Any, kwargs: Any) -> None:
    """Bump each buffer's in-place counter after a step: bitsandbytes' optimizers write through raw
    pointers, which autograd's counter does not see, and the adapters' compute-dtype copies
    (`kernels.adapter_cast`) are remade when it moves."""
    torch.autograd.graph.increment_version([group.param for group in optimizer.flat_groups])


@functools.cache
def _flat_class(cls: type[torch.optim.Optimizer]) -> type[torch.optim.Optimizer]:
    return type(f"Flat{cls.__name__}", (_FlatStep, cls), {"__doc__": f"{cls.__name__} over flat buffers."})


def flat_optimizer(cls: type[torch.optim.Optimizer], params: Iterable[nn.Parameter],
                   **kwargs: Any) -> torch.optim.Optimizer:
    """`cls(params, **kwargs)`, but over one flat buffer per (device, dtype) of `params` (moved there now).

    The result is an instance of `cls` (schedulers, GradScaler and state dicts work as usual); its
    `param_groups` hold the flat Parameters and `flat_groups` the FlatParams that map them to `params`.
    """
    return _flat_class(cls)(flatten_params(params), **kwargs)
