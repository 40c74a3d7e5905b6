"""Activation memory strategies of our decoder stack: which layers recompute in the backward, and where their
saved inputs live.

    off        every layer keeps its activations (fastest, most memory)
    on         each layer keeps only its input x and is recomputed in the backward (~1/3 more matmul FLOPs)
    offload    as `on`, with x copied to pinned CPU memory on a side stream while the next layers run,
               and copied back one layer ahead of the backward that needs it
    selective  the last `keep_layers` layers keep everything, the others recompute with offloaded inputs;
               `keep_layers` comes from the memory budget (`fasttune.models.memory.plan_keep_layers`)

Keeping whole layers beats keeping parts of every layer: a Llama layer's MLP holds ~80% of its FLOPs and
its two (tokens, intermediate) products most of its saved bytes, so FLOPs saved per byte kept are highest
for whole layers. The trailing layers are the ones kept, because their activations are consumed first.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHECKPOINT_MODES = ("off", "on", "offload", "selective")


class LayerInputOffloader:
    """Saved-tensor hooks that keep each checkpointed layer's input in pinned host memory.

    Forward (pack): the copy to the host runs on a side stream after the compute stream has produced x; the
    allocator is told (`record_stream`) that the side stream still reads x, so its memory is reused only
    after the copy. Backward (unpack, layers in reverse order): layer i's input is copied back, and layer
    i-1's copy back is started on the side stream right away, so it overlaps layer i's backward.
    One offloader serves one forward/backward; on the CPU it degrades to plain copies.
    """

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.host: list[torch.Tensor] = []
        self.d2h: list[torch.cuda.Event | None] = []
        self.device = device
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}

    def pack(self, t: torch.Tensor) -> int:
        idx = len(self.host)
        if not self.cuda:
            self.host.append(t.detach().clone())
            self.d2h.append(None)
            return idx
        compute = torch.cuda.current_stream(t.device)
        self.stream.wait_stream(compute)  # x is complete before the side stream reads it
        with torch.cuda.stream(self.stream):
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        t.record_stream(self.stream)
        self.host.append(host)
        self.d2h.append(done)
        return idx

    def _fetch(self, idx: int, stream: torch.cuda.Stream) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Start the copy back of input `idx` on `stream`; returns the device tensor and its done event."""
        with torch.cuda.stream(stream):
            stream.wait_event(self.d2h[idx])
            dev = self.host[idx].to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(stream)
        return dev, done

    def unpack(self, idx: int) -> torch.Tensor:
        if not self.cuda:
            return self.host[idx]
        compute = torch.cuda.current_stream(self.device)
        if idx in self.prefetched:
            dev, done = self.prefetched.pop(idx)
            compute.wait_event(done)
            dev.record_stream(compute)  # allocated on the side stream, used (and freed) on this one
        else:
            dev, _ = self._fetch(idx, compute)
        if idx > 0 and idx - 1 not in self.prefetched:
            self.prefetched[idx - 1] = self._fetch(idx - 1, self.stream)
        # The host copy may be reused by the next step's forward once this one is read.
        return dev

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def run_layers(
    layers: nn.ModuleList,
    x: torch.Tensor,
    run: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
    mode: str,
    keep_layers: int,
) -> torch.Tensor:
    """x through every layer (`run(layer, x, i)`), recomputing layers 0 .. n - keep_layers - 1 per `mode`.

    The non-reentrant checkpoint saves its tensor arguments through the saved-tensor hooks active where it
    is called, so the offloader sees exactly each layer's input x; what `run` closes over (RoPE tables,
    the attention mask) is shared by every layer and stays where it is.
    """
    n = len(layers)
    recompute_upto = 0 if mode == "off" else n - min(max(keep_layers, 0), n) if mode == "selective" else n
    offload = mode in ("offload", "selective") and recompute_upto > 0
    offloader = LayerInputOffloader(x.device) if offload else None
    for i, layer in enumerate(layers):
        if i >= recompute_upto:
            x = run(layer, x, i)
        elif offloader is None:
            x = checkpoint(run, layer, x, i, use_reentrant=False)
        else:
            with offloader.hooks():
                x = checkpoint(run, layer, x, i, use_reentrant=False)
    return x
