"""One block of pinned host memory per device that every step's offloaded activations are cut from.

Pinning host memory (`cudaHostAlloc`) takes milliseconds per tensor, and torch's pinned allocator keeps
its blocks per power-of-two size: while a run meets new batch widths (uneven rows, packing off) each new
size pins afresh, tens of milliseconds per layer. The arena pins once, at the size the run's plan needs
(`reserve`), and each forward's offloader takes consecutive slices of it.

A forward's slices form a `Lease`, which ends when its offloader is freed (its backward has run, or its
graph was dropped). A forward begun while another's copies are still held (two forwards, then their
backwards) takes its slices after the live ones, so no copy is written over before it is read; a slice
that does not fit returns None and the offloader pins that tensor on its own, as before. The arena grows to
what the passes asked for the next time no lease is live, after the device has finished with the old block.

A training step captured as a CUDA graph (`train.step_graph`) replays its forward's copies into the slices
it was captured with, at their addresses: while such a graph lives the arena is frozen (`freeze`), and its
block is not replaced. Its slices may be taken by other leases between replays, as eager steps take each
other's: a replay writes them in its forward before its backward reads them, in device order.

Reuse in device order: every copy into a slice is queued on the offloader's copy stream after it has waited
for the compute stream, which by then has queued the previous step's backward (the reads of that slice), so
a slice is written again only after it was read.
"""

from __future__ import annotations

import weakref

import torch

from fasttune.memory.host import HOST_SHARE, host_bytes

ALIGN = 4096  # bytes: every slice starts on a page
# a block grown while training holds this much more than the passes asked for (within the host rule), so
# that widths a little past the widest seen do not grow it again
GROW_MARGIN = 1.25

_ARENAS: dict[torch.device, PinnedArena] = {}


def aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _unregister(ptr: int) -> None:
    try:
        torch.cuda.cudart().cudaHostUnregister(ptr)
    except Exception:  # the CUDA context may already be gone at exit
        pass


def _block(nbytes: int, pin: bool) -> torch.Tensor:
    """nbytes of host memory, page-locked where `pin`: plain memory registered with CUDA (exactly nbytes;
    torch's pinned allocator would round it up to a power of two), or, where registration fails, torch's
    pinned allocation."""
    block = torch.empty(nbytes, dtype=torch.uint8)
    if not pin or nbytes == 0:
        return block
    ptr = block.data_ptr()
    try:
        torch.cuda.cudart().cudaHostRegister(ptr, nbytes, 0)
    except (AttributeError, RuntimeError):  # a build without the binding: the pinned allocator's block
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    # unregistered when the arena lets the block go (no lease is live then, so no slice of it is held)
    weakref.finalize(block, _unregister, ptr).atexit = False
    if not block.is_pinned():
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    return block


class Lease:
    """One forward's slices of the arena: bytes [start, end), growing with each `take`."""

    def __init__(self, arena: PinnedArena, start: int) -> None:
        self.arena, self.start, self.end, self.asked = arena, start, start, 0

    def take(self, nbytes: int) -> torch.Tensor | None:
        """nbytes of the arena (uint8), or None where they do not fit (or a later lease has begun)."""
        return self.arena._take(self, nbytes)


class PinnedArena:
    """The pinned block of one device and the leases cut from it (module docstring). `pin=False`: plain host
    memory (the CPU, tests)."""

    def __init__(self, pin: bool) -> None:
        self.pin = pin
        self.block = torch.empty(0, dtype=torch.uint8)
        self.live: list[Lease] = []  # in the order they began
        self.need = 0  # the most any lease asked for (aligned, from its start), or what `reserve` was told
        self.grows = 0  # how often the block was replaced by a larger one
        self.frozen = 0  # graphs that recorded slices of the block: it is not replaced while any lives

    @property
    def capacity(self) -> int:
        return self.block.numel()

    def room(self) -> int:
        """The most the block may take: the host rule's share of this process's host memory."""
        return int(HOST_SHARE * host_bytes())

    def reserve(self, nbytes: int) -> None:
        """Make room for a step whose copies take nbytes (aligned slices), now if no lease is live."""
        self.need = max(self.need, nbytes)
        if not self.live:
            self._grow(margin=1.0)

    def lease(self) -> Lease:
        """The slices of a new forward: after the live leases' slices, or from the start when none is live
        (growing first to what earlier forwards asked for)."""
        if not self.live:
            self._grow(margin=GROW_MARGIN)
        lease = Lease(self, self.live[-1].end if self.live else 0)
        self.live.append(lease)
        return lease

    def freeze(self) -> None:
        """A graph recorded slices of the block: keep it until the matching `thaw` (module docstring)."""
        self.frozen += 1

    def thaw(self) -> None:
        self.frozen -= 1

    def end(self, lease: Lease) -> None:
        """The lease's copies are no longer read: its slices may be taken again."""
        self.need = max(self.need, lease.start + lease.asked)
        if lease in self.live:
            self.live.remove(lease)

    def _take(self, lease: Lease, nbytes: int) -> torch.Tensor | None:
        n = aligned(nbytes)
        lease.asked += n
        if not self.live or lease is not self.live[-1] or lease.end + n > self.capacity:
            return None
        out = self.block[lease.end:lease.end + nbytes]
        lease.end += n
        return out

    def _grow(self, margin: float) -> None:
        """A larger block, of `margin` x `need` within the host rule, where `need` passes the block."""
        want = min(aligned(int(self.need * margin)), aligned(self.room()))
        if self.need <= self.capacity or want <= self.capacity or self.frozen:
            return
        if self.pin and self.capacity:
            torch.cuda.synchronize()  # the old block's last copies are done before it is let go
        self.block = torch.empty(0, dtype=torch.uint8)
        self.block = _block(want, self.pin)
        self.grows += 1


def arena(device: torch.device) -> PinnedArena:
    """The arena of `device`'s offloaded copies, one for the process (pinned for a CUDA device); 'cuda'
    without an index is the current device, as tensors name it."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device not in _ARENAS:
        _ARENAS[device] = PinnedArena(pin=device.type == "cuda")
    return _ARENAS[device]


def reserve(device: torch.device, nbytes: int) -> None:
    """Pin room for a step whose offloaded copies take nbytes (`memory.plan.pinned_copy_bytes`) before the
    first step, so that no step pins memory."""
    arena(device).reserve(nbytes)
