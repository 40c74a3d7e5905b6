"""Layer inputs in pinned host memory: the offloader's saved-tensor hooks, copy stream and pinned copies."""

from __future__ import annotations

import weakref

import torch

from fasttune.memory.host import pinned_pieces
from fasttune.memory.pinned import arena

_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The offloader's copy stream on `device`, one for the process. The caching allocator keeps the blocks
    freed by each stream for that stream alone, and `torch.cuda.Stream()` hands out a different stream of
    its pool at each call: a new one per step would let the reserved memory grow each step."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class PinnedCopy:
    """A device tensor's copy in host memory: in a slice of the pinned arena (`into`), or pinned on its own
    in `pinned_pieces` (`of`; a non-contiguous tensor, which our layers do not offload, in one piece). The
    copies are queued on the current stream; `pin=False` (the CPU, tests) takes plain host memory."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, pieces: list[torch.Tensor]) -> None:
        self.shape, self.dtype, self.pieces = shape, dtype, pieces

    @classmethod
    def into(cls, t: torch.Tensor, block: torch.Tensor, non_blocking: bool) -> PinnedCopy:
        """t copied into `block`, bytes of the arena (uint8, exactly t's size)."""
        host = block.view(t.dtype).view(t.shape)
        host.copy_(t.detach(), non_blocking=non_blocking)
        return cls(t.shape, t.dtype, [host.view(-1)])

    @classmethod
    def of(cls, t: torch.Tensor, pin: bool = True) -> PinnedCopy:
        t = t.detach()
        if not t.is_contiguous():
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=pin)
            host.copy_(t, non_blocking=True)
            return cls(t.shape, t.dtype, [host.view(-1)])
        flat, start, pieces = t.view(-1), 0, []
        for n in pinned_pieces(t.numel() * t.element_size()):
            piece = torch.empty(n // t.element_size(), dtype=t.dtype, pin_memory=pin)
            piece.copy_(flat[start:start + piece.numel()], non_blocking=True)
            pieces.append(piece)
            start += piece.numel()
        return cls(t.shape, t.dtype, pieces)

    def copy_into(self, dev: torch.Tensor) -> None:
        flat, start = dev.view(-1), 0
        for piece in self.pieces:
            flat[start:start + piece.numel()].copy_(piece, non_blocking=True)
            start += piece.numel()


class LayerInputOffloader:
    """Saved-tensor hooks that keep each checkpointed layer's input in pinned host memory.

    Forward (pack): the copy to the host runs on a side stream after the compute stream has produced x. The
    offloader holds x while the next `copy_lag` layers run their forward; then the compute stream waits for
    x's copy and x is let go, so its memory goes back to the compute stream's blocks in stream order,
    reusable at once. (Telling the allocator instead that the side stream reads x, `record_stream`, would
    keep the block out of use until the host sees the copy done, and the host runs far ahead of the GPU, so
    the cache would grow far past the peak of allocations.)
    Backward (unpack, layers in reverse order): layer i's input is copied back, and layer i-1's copy back is
    started on the side stream right away, into memory of the compute stream, so it overlaps layer i's
    backward. The tensors of a layer whose plan keeps them on the device (`resident`, set by `run_layers`
    from `LayerPlan.input`) stay there: the last recomputed layer's, whose backward runs right after the loss
    with nothing to overlap their copy back, and those of the trailing layers the host rule leaves no room
    for. The host copies are slices of the device's pinned arena (`memory.pinned`), under a lease that ends
    when the offloader is freed. One offloader serves one forward/backward; on the CPU its copies are plain
    (synchronous) copies into the arena's host memory.
    """

    def __init__(self, device: torch.device, copy_lag: int = 2) -> None:
        # layers whose forward a layer's copies to the host may take before the compute stream waits for them
        # (each layer held adds its offloaded tensors to the forward's memory)
        self.copy_lag = copy_lag
        self.resident = False  # set per layer by `run_layers`: its tensors stay on the device
        self.kept: dict[int, torch.Tensor] = {}  # the resident tensors, until their backward reads them
        self.cuda = device.type == "cuda"
        self.stream = side_stream(device) if self.cuda else None
        self.host: list[torch.Tensor] = []
        self.d2h: list[torch.cuda.Event | None] = []
        self.device = device
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.group: list[int] = []  # layer of each packed tensor: a layer's tensors are fetched together
        self.first_of: dict[int, int] = {}  # layer -> the index of its first packed tensor
        self.layer = 0
        self.copying: list[tuple[int, torch.Tensor, torch.cuda.Event]] = []  # (layer, x, its copy's event)
        self.lease = arena(device).lease()
        weakref.finalize(self, self.lease.arena.end, self.lease)

    def _copy_out(self, t: torch.Tensor) -> PinnedCopy:
        """t's copy on the host, queued on the current stream: into the lease's next slice, or pinned on its
        own where the arena has no room left."""
        block = self.lease.take(t.numel() * t.element_size())
        if block is None:
            return PinnedCopy.of(t, pin=self.cuda)
        return PinnedCopy.into(t, block, non_blocking=self.cuda)

    def _let_go(self, before: int) -> None:
        """Release the device tensors of layers < `before` whose copies to the host were queued: the compute
        stream waits for each copy, then the tensor goes back to its blocks, in stream order."""
        keep = []
        compute = torch.cuda.current_stream(self.device) if self.copying else None
        for layer, t, done in self.copying:
            if layer < before:
                compute.wait_event(done)
            else:
                keep.append((layer, t, done))
        self.copying = keep

    def pack(self, t: torch.Tensor) -> int | torch.Tensor:
        if t.device != self.device or t.numel() == 0:  # the checkpoint's placeholder (CPU): keep it as it is
            return t
        idx = len(self.host)
        self.group.append(self.layer)
        self.first_of.setdefault(self.layer, idx)
        if self.cuda:
            self._let_go(before=self.layer + 1 - self.copy_lag)  # older layers' copies are due
        if self.resident:  # its backward comes first, right after the loss: a round trip would stall it
            self.kept[idx] = t
            self.host.append(None)
            self.d2h.append(None)
            return idx
        if not self.cuda:
            self.host.append(self._copy_out(t))
            self.d2h.append(None)
            return idx
        compute = torch.cuda.current_stream(t.device)
        self.stream.wait_stream(compute)  # x is complete before the side stream reads it
        with torch.cuda.stream(self.stream):
            host = self._copy_out(t)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.copying.append((self.layer, t, done))
        self.host.append(host)
        self.d2h.append(done)
        return idx

    def _fetch_now(self, idx: int) -> torch.Tensor:
        """Copy input `idx` back on the compute stream (a layer whose input was not prefetched: the first
        layer the backward meets)."""
        host = self.host[idx]
        dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        torch.cuda.current_stream(self.device).wait_event(self.d2h[idx])
        host.copy_into(dev)
        return dev

    def _prefetch_layer(self, idxs: list[int]) -> None:
        """Start the copy back of one layer's inputs `idxs` on the side stream into memory of the compute
        stream (allocated there, once the work queued there, which may have freed that memory, is done),
        under one wait, one stream switch and one event for them all (the compute stream waits for the
        event before it reads them): this host work comes at the head of each layer's backward, where the
        GPU waits on it whenever the host is barely ahead."""
        compute = torch.cuda.current_stream(self.device)
        devs = [torch.empty(self.host[j].shape, dtype=self.host[j].dtype, device=self.device) for j in idxs]
        self.stream.wait_stream(compute)
        with torch.cuda.stream(self.stream):
            for j, dev in zip(idxs, devs):
                self.stream.wait_event(self.d2h[j])
                self.host[j].copy_into(dev)
            done = torch.cuda.Event()
            done.record(self.stream)
        for j, dev in zip(idxs, devs):
            self.prefetched[j] = (dev, done)

    def unpack(self, idx: int | torch.Tensor) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            return idx
        if self.copying:  # the backward has begun: every copy to the host is due
            self._let_go(before=1 << 30)
        if idx in self.kept:
            dev = self.kept.pop(idx)  # read once, by its layer's backward: not held past it
        elif not self.cuda:  # a tensor of its own: the arena's slice is written again by a later forward
            host = self.host[idx]
            dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
            host.copy_into(dev)
            return dev
        elif idx in self.prefetched:
            dev, done = self.prefetched.pop(idx)
            torch.cuda.current_stream(self.device).wait_event(done)  # the copy is in before it is read
        else:
            dev = self._fetch_now(idx)
        # Start copying back the previous layer's tensors, to overlap this layer's backward.
        first = self.first_of[self.group[idx]]
        if first > 0 and self.cuda:
            prev = self.first_of[self.group[first - 1]]
            todo = [j for j in range(prev, first) if j not in self.prefetched and j not in self.kept]
            if todo:
                self._prefetch_layer(todo)
        return dev

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)
