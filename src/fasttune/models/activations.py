"""Activation memory strategies of our decoder stack: which layers recompute in the backward, and where their
saved inputs live.

    off        every layer keeps its activations (fastest, most memory)
    on         each layer keeps only its input x and is recomputed in the backward (~1/3 more matmul FLOPs)
    offload    as `on`, with x copied to pinned CPU memory on a side stream while the next layers run,
               and copied back one layer ahead of the backward that needs it (as many layers as the host
               has room for: the trailing rest keep x on the device, `host_input_layers`)
    selective  the last `keep_layers` layers keep everything, the others recompute with offloaded inputs;
               `keep_layers` comes from the memory budget (`fasttune.models.memory.plan_keep_layers`)

With the fused LoRA path, 'offload' and 'selective' recompute a layer in two halves (`LayerRecompute`): its
input x and its midpoint x_mid = x + attn(x) both go to the host, and the backward of each half reruns only
what that backward reads: RMSNorm, q/k/v and attention for the first half, RMSNorm, gate and up for the
second. The o and down projections' base products (a quarter of a layer's matmul FLOPs) are not rerun
(the rerun of `memory.layer_pass.LayerPass`), which an autograd-level checkpoint cannot know to skip.

Gate/up on the host (`host_gate_up`, a share of the recomputed layers, spread evenly): such a layer also sends
its MLP's gate and up outputs g, u (two (tokens, intermediate) tensors) to pinned host memory in the forward,
and its backward takes them back instead of rerunning the gate and up products, the bulk of the recompute.
They are 3.5x a layer input on Llama-3.1-8B, so the share is bounded by the host link: the copies must hide
under the forward's compute, and by host memory (`host_fits`; as many layers as fit keep them). 'auto'
(`link_gate_up_share`, with kept attention) takes half the room the link has beside the other copies,
counted in the forward's FLOPs: none on Llama-3.1-8B at 8 x 2048 (the layer inputs' copies fill the link),
6 of 32 layers at 1 x 32,768, where attention adds compute without adding copies (+1.0-1.4% in
benchmarks/RESULTS.md).

Gate/up on the device (`device_gate_up`, a number of layers, 1 by default): the last recomputed layers hold
their gate and up outputs on the device (not through the offloader), and their reruns skip those products.
With no kept layers the last one is free: its backward comes first, right after the loss, and would make
them again anyway, so they add to the peak only while the loss runs (one chunk of logits). Each further
layer adds its g and u (3.5x a layer input on Llama-3.1-8B) to the peak.

Kept attention (`keep_attention`, on by default where the kernel allows: plain causal rows on CUDA where SDPA
picks cuDNN, packed rows where the variable-length flash kernel runs): each recomputed layer also sends its
attention output O (the size of x) and the softmax's log-sum-exp to the host, and the rerun of its first
half skips the attention forward; the attention backward reads the kept O and lse
(`models/kept_attention.py`). Attention is quadratic in the row length, so this
pays most on long rows (~40% of a Llama-3.1-8B layer's forward at 32,768 tokens; +11% per step measured).
With `keep_qkv` (on by default with kept attention, where the host has
room) such layers also keep q and k after RoPE and v (1.5x a layer input on Llama-3.1-8B), and the rerun
of the first half skips the q/k/v base products and RoPE as well: it is left with RMSNorm and the rank-r
products.

Keeping whole layers beats keeping parts of every layer: a Llama layer's MLP holds ~80% of its FLOPs and
its two (tokens, intermediate) products most of its saved bytes, so FLOPs saved per byte kept are highest
for whole layers. The trailing layers are the ones kept, because their activations are consumed first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

CHECKPOINT_MODES = ("off", "on", "offload", "selective")
KEEP_ATTENTION = ("auto", "reference", "off")


class _Halves(Protocol):
    """A pre-norm residual layer, its two branches exposed: x_mid = x + attn(x), out = x_mid + mlp(x_mid)."""

    def attn_branch(self, x: torch.Tensor, *args) -> torch.Tensor: ...
    def mlp_branch(self, x: torch.Tensor) -> torch.Tensor: ...
    def recompute_in_halves(self) -> bool: ...


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The offloader's copy stream on `device`, one for the process. The caching allocator keeps the blocks
    freed by each stream for that stream alone, and `torch.cuda.Stream()` hands out a different stream of
    its pool at each call: with a new one per step, the reserved memory grew each step (28 MiB a step on
    the CUDA test's small model, tests/models/test_llama.py)."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class _PinnedCopy:
    """A device tensor's copy in pinned host memory, in `pinned_pieces` (a non-contiguous tensor, which our
    layers do not offload, in one piece). The copies are queued on the current stream; `pin=False` (tests on
    the CPU) takes plain host memory."""

    def __init__(self, shape: torch.Size, dtype: torch.dtype, pieces: list[torch.Tensor]) -> None:
        self.shape, self.dtype, self.pieces = shape, dtype, pieces

    @classmethod
    def of(cls, t: torch.Tensor, pin: bool = True) -> _PinnedCopy:
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
    reusable at once. (Telling the allocator instead that the side stream reads x, `record_stream`, keeps
    the block out of use until the host sees the copy done, and the host runs far ahead of the GPU: on
    Llama-3.1-8B at 1 x 32,768 the cache grew to 41 GiB under an 11.6 GiB peak of allocations.)
    Backward (unpack, layers in reverse order): layer i's input is copied back, and layer i-1's copy back is
    started on the side stream right away, into memory of the compute stream, so it overlaps layer i's
    backward. The last layer's tensors (`resident`, set by `run_layers`) stay on the device: its backward
    runs right after the loss, with nothing to overlap their copy back (on Llama-3.1-8B at 8 x 2048 a ~11 ms
    stall per step). So do those of the trailing layers that the host rule leaves no room for
    (`host_input_layers`). One offloader serves one forward/backward; on the CPU it degrades to plain
    copies.
    """

    def __init__(self, device: torch.device, copy_lag: int = 2) -> None:
        # layers whose forward a layer's copies to the host may take before the compute stream waits for them
        # (each layer held adds its offloaded tensors to the forward's memory)
        self.copy_lag = copy_lag
        self.resident = False  # set for the last recomputed layers: their tensors stay on the device
        self.kept: dict[int, torch.Tensor] = {}  # the resident tensors, until their backward reads them
        self.cuda = device.type == "cuda"
        self.stream = side_stream(device) if self.cuda else None
        self.host: list[torch.Tensor] = []
        self.d2h: list[torch.cuda.Event | None] = []
        self.device = device
        self.prefetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.group: list[int] = []  # layer of each packed tensor: a layer's tensors are fetched together
        self.layer = 0
        self.copying: list[tuple[int, torch.Tensor, torch.cuda.Event]] = []  # (layer, x, its copy's event)

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
        if self.cuda:
            self._let_go(before=self.layer + 1 - self.copy_lag)  # older layers' copies are due
        if self.resident:  # its backward comes first, right after the loss: a round trip would stall it
            self.kept[idx] = t
            self.host.append(None)
            self.d2h.append(None)
            return idx
        if not self.cuda:
            self.host.append(t.detach().clone())
            self.d2h.append(None)
            return idx
        compute = torch.cuda.current_stream(t.device)
        self.stream.wait_stream(compute)  # x is complete before the side stream reads it
        with torch.cuda.stream(self.stream):
            host = _PinnedCopy.of(t)
            done = torch.cuda.Event()
            done.record(self.stream)
        self.copying.append((self.layer, t, done))
        self.host.append(host)
        self.d2h.append(done)
        return idx

    def _fetch(self, idx: int, stream: torch.cuda.Stream) -> tuple[torch.Tensor, torch.cuda.Event]:
        """Start the copy back of input `idx` on `stream` into memory of the compute stream (once the work
        queued there, which may have freed that memory, is done); returns the device tensor and the copy's
        event, which the compute stream waits for before it reads the tensor."""
        compute = torch.cuda.current_stream(self.device)
        host = self.host[idx]
        dev = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        if stream != compute:
            stream.wait_stream(compute)
        with torch.cuda.stream(stream):
            stream.wait_event(self.d2h[idx])
            host.copy_into(dev)
            done = torch.cuda.Event()
            done.record(stream)
        return dev, done

    def unpack(self, idx: int | torch.Tensor) -> torch.Tensor:
        if isinstance(idx, torch.Tensor):
            return idx
        if self.copying:  # the backward has begun: every copy to the host is due
            self._let_go(before=1 << 30)
        if idx in self.kept:
            dev = self.kept.pop(idx)  # read once, by its layer's backward: not held past it
        elif not self.cuda:
            return self.host[idx]
        elif idx in self.prefetched:
            dev, done = self.prefetched.pop(idx)
            torch.cuda.current_stream(self.device).wait_event(done)  # the copy is in before it is read
        else:
            dev, _ = self._fetch(idx, torch.cuda.current_stream(self.device))
        # Start copying back the previous layer's tensors, to overlap this layer's backward.
        first = self.group.index(self.group[idx])
        if first > 0 and self.cuda:
            prev = self.group[first - 1]
            for j in range(first - 1, -1, -1):
                if self.group[j] != prev:
                    break
                if j not in self.prefetched and j not in self.kept:
                    self.prefetched[j] = self._fetch(j, self.stream)
        return dev

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class LayerRecompute(torch.autograd.Function):
    """out = layer(x), keeping only x and x_mid; the backward reruns each half for its own gradients.

    Inputs: x, the layer, the extra arguments of its attention branch, where to keep the MLP's gate/up
    outputs instead of recomputing them ('host': saved like x, so through the offloader; 'device': held on
    the device; '': not kept), whether to keep the attention's output and log-sum-exp the same way
    (`kept_attention`: the rerun then skips the attention forward; 'auto' where the kernel allows,
    'reference' also off CUDA, for tests, or 'off'), whether the kept attention also keeps q, k, v (the rerun
    then skips their products and RoPE), and `anchors` (tensors that require grad, e.g. the layer's adapter
    weights, so that the output requires grad even when x does not). Each branch runs with a
    `memory.layer_pass.LayerPass`: in the forward the branch's last product adds the residual in its
    epilogue and the fused ops fill the pass's `kept` (the down adapter's h A_d^T always, so the MLP's
    backward does not read h again for it); in the rerun they take from it and skip their outputs, and the
    branch's input norm adds the upstream gradient to its input's. The inner backwards accumulate parameter
    gradients straight into `.grad`, as a reentrant checkpoint does.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, layer, attn_args, keep_gate_up, keep_attention, keep_qkv, *anchors):
        from fasttune.memory.layer_pass import LayerKept, LayerPass

        kept = LayerKept()
        with torch.no_grad():
            # each branch's last projection adds the residual in its GEMM's epilogue
            x_mid = layer.attn_branch(x, *attn_args, layer_pass=LayerPass(
                residual=x, keep_attention=keep_attention, keep_qkv=keep_qkv, kept=kept))
            out = layer.mlp_branch(x_mid, layer_pass=LayerPass(
                residual=x_mid, keep_gate_up=bool(keep_gate_up), kept=kept))
        ctx.layer, ctx.attn_args = layer, attn_args
        # h A_d^T of the down adapter, (tokens, r): kept on the device (a fraction of a percent of x), held by
        # ctx as an intermediate rather than saved through the offloader
        ctx.down_a = kept.down_a
        kept_gate_up = kept.gate_up or ()
        # on the device: held by ctx, like down_a; on the host: saved, so through the offloader
        ctx.device_gate_up = kept_gate_up if keep_gate_up == "device" else ()
        if ctx.device_gate_up:
            kept_gate_up = ()
        kept_attn = kept.attention
        del kept
        ctx.n_gate_up = len(kept_gate_up)
        ctx.kept_attn = (kept_attn.backend, kept_attn.extra) if kept_attn is not None else None
        ctx.save_for_backward(x, x_mid, *kept_gate_up,
                              *(kept_attn.tensors() if kept_attn is not None else ()))
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, d_out):
        from fasttune.memory.layer_pass import LayerKept, LayerPass
        from fasttune.models.kept_attention import KeptAttention

        x, x_mid, *rest = ctx.saved_tensors
        down_a, ctx.down_a = ctx.down_a, None
        gate_up, rest = rest[:ctx.n_gate_up], rest[ctx.n_gate_up:]
        gate_up, ctx.device_gate_up = gate_up or ctx.device_gate_up, ()
        given_attn = KeptAttention.from_tensors(rest, *ctx.kept_attn) if ctx.kept_attn is not None else None
        del rest
        layer = ctx.layer
        with torch.enable_grad():
            xm = x_mid.detach().requires_grad_(True)
            # out = x_mid + mlp(x_mid): d_out joins x_mid's gradient in the branch's norm backward
            p = LayerPass(rerun=True, grad_addend=d_out,
                          kept=LayerKept(gate_up=tuple(gate_up) if gate_up else None, down_a=down_a))
            y = layer.mlp_branch(xm, layer_pass=p)
            del gate_up, down_a, p  # the MLP's backward writes its gradients over gate/up
            torch.autograd.backward(y, d_out)
            del y
            d_mid = xm.grad
            del xm
            want_dx = ctx.needs_input_grad[0]  # not for layer 0 under a frozen embedding
            xi = x.detach().requires_grad_(want_dx)
            p = LayerPass(rerun=True, grad_addend=d_mid if want_dx else None,
                          kept=LayerKept(attention=given_attn))
            a = layer.attn_branch(xi, *ctx.attn_args, layer_pass=p)
            del given_attn, p
            torch.autograd.backward(a, d_mid)
            del a
            dx = xi.grad if want_dx else None  # x_mid = x + attn(x): d_mid joined in the norm's backward
        return dx, None, None, None, None, None, *(None for _ in ctx.needs_input_grad[6:])


def _host_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: assume the host is large enough
        return 1 << 62


HOST_SHARE = 0.4  # of host memory, for the pinned copies of offloaded activations
# Forward FLOPs under which one byte of host copies hides: ~680 TFLOP/s of bf16 products over the ~57 GB/s the
# copies ran at on an H100 (benchmarks/RESULTS.md). Cards with less compute per byte of link hide more.
LINK_FLOP_PER_BYTE = 12_000


PIN_PIECE_MIN = 1 << 20  # bytes: the smallest power-of-two piece a pinned copy is split into


def pinned_pieces(n: int) -> list[int]:
    """The byte sizes of the pieces an n-byte tensor is pinned in: powers of two, largest first, down to
    PIN_PIECE_MIN, then the rest in one. torch's host caching allocator rounds each allocation up to a power
    of two: whole, a 2.5 GiB layer input (Llama-3.1-8B at 1 x 327,680) would take 4 GiB; in pieces of 2 GiB
    and 0.5 GiB it takes 2.5."""
    pieces = []
    while n >= PIN_PIECE_MIN:
        pieces.append(1 << (n.bit_length() - 1))
        n -= pieces[-1]
    return pieces + [n] if n else pieces


def pinned_bytes(n: int) -> int:
    """The pinned host memory an n-byte tensor takes in its `pinned_pieces`, as the allocator rounds them."""
    return sum(1 << (p - 1).bit_length() for p in pinned_pieces(n))


def halves_fit_host(layers: int, layer_input_bytes: int, kept_attention: bool = False,
                    kept_qkv: float = 0.0) -> bool:
    """Recompute in halves pins x and x_mid (and the kept attention output, as large, and kept q, k, v,
    `kept_qkv` times as large) of every recomputed layer: allowed under 40% of host memory."""
    return host_fits(layers, layer_input_bytes, 0, 0, kept_attention, kept_qkv)


def spread(n: int, k: int) -> set[int]:
    """k indices of range(n) spaced evenly (the host copies of their gate/up interleave with other layers)."""
    return {int((j + 0.5) * n / k) for j in range(k)} if k > 0 else set()


def host_fits(layers: int, layer_input_bytes: int, gate_up_layers: int, gate_up_bytes: int,
              kept_attention: bool = False, kept_qkv: float = 0.0) -> bool:
    """The pinned host memory of recompute in halves with `gate_up_layers` layers' gate/up (g and u, together
    `gate_up_bytes`) kept there (and with `kept_attention`, each layer's attention output, the size of its
    input, and its q, k, v, `kept_qkv` times that size), each tensor as the pinned allocator rounds it."""
    per_layer = (3 + kept_qkv if kept_attention else 2) * pinned_bytes(layer_input_bytes)
    gate_up = 2 * pinned_bytes(gate_up_bytes // 2)
    return layers * per_layer + gate_up_layers * gate_up < HOST_SHARE * _host_bytes()


def host_input_layers(layers: int, layer_input_bytes: int) -> int:
    """How many of `layers` whole-layer recomputes may keep their input on the host (the pinned tensors of
    that many within the host rule, as the pinned allocator rounds them); the trailing rest keep it on the
    device. On Llama-3.1-8B at 1 x 262,144 tokens a layer's input is 2 GiB: 25 of 32 layers on a 128 GiB
    host, where all 32 would pin half of it."""
    per = pinned_bytes(layer_input_bytes)
    room = int(HOST_SHARE * _host_bytes())
    return layers if per == 0 else min(layers, max(0, (room - 1) // per))


def host_gate_up_count(layers: int, share: float, layer_input_bytes: int, gate_up_bytes: int,
                       kept_attention: bool = False, kept_qkv: float = 0.0) -> int:
    """How many of `layers` recomputed layers keep gate/up on the host: round(share x layers) in [0, layers],
    or as many as the host rule (`host_fits`) leaves room for beside the layers' other pinned tensors."""
    k = min(layers, max(0, round(share * layers)))
    while k and not host_fits(layers, layer_input_bytes, k, gate_up_bytes, kept_attention, kept_qkv):
        k -= 1
    return k


def link_gate_up_share(tokens: int, span: int, attn_width: int, layer_params: int, layer_input_bytes: int,
                       gate_up_bytes: int, copied_per_input: float) -> float:
    """host_gate_up 'auto': the share of recomputed layers whose gate/up the host link carries in the forward.

    A layer's forward does 2 x tokens x `layer_params` FLOPs in its linears and 2 x tokens x `span` x
    `attn_width` in causal attention over rows of `span` tokens (0 where the rows are unknown, e.g. packed),
    which hide `LINK_FLOP_PER_BYTE` bytes of copies each; its inputs (`copied_per_input` x
    `layer_input_bytes`) go first, and half of the room left goes to gate/up: the copies come in bursts, and
    on the H100 the share past that ran slower (benchmarks/RESULTS.md, 1 x 32,768)."""
    flops = 2 * tokens * layer_params + 2 * tokens * span * attn_width
    room = flops / LINK_FLOP_PER_BYTE - copied_per_input * layer_input_bytes
    return min(1.0, max(0.0, 0.5 * room / gate_up_bytes)) if gate_up_bytes > 0 else 0.0


def run_layers(
    layers: nn.ModuleList,
    x: torch.Tensor,
    run: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
    mode: str,
    keep_layers: int,
    attn_args: tuple = (),
    gate_up: tuple[float, int] = (0.0, 0),
    keep_attention: str = "off",
    keep_qkv: float = 0.0,
    device_gate_up: int = 1,
) -> torch.Tensor:
    """x through every layer (`run(layer, x, i)`), recomputing layers 0 .. n - keep_layers - 1 per `mode`.

    With an offloading mode, a layer that supports it (`_Halves.recompute_in_halves`) runs
    through `LayerRecompute` with `layer.attn_branch(x, *attn_args)`. gate_up = (share, intermediate size):
    that share of the recomputed layers keeps its MLP gate/up outputs on the host (module docstring), or as
    many as the host has room for. keep_attention ('auto', 'reference', 'off'): such layers
    also keep their attention output for the backward (`LayerRecompute`), when the host has room;
    keep_qkv: the size of a layer's q, k, v relative to x, > 0 to keep them too (when the host has room);
    device_gate_up: with an offloading mode, that many of the last recomputed layers hold gate/up on the
    device instead (module docstring).

    The non-reentrant checkpoint saves its tensor arguments through the saved-tensor hooks active where it
    is called, so the offloader sees exactly each layer's input x; what `run` closes over (RoPE tables,
    the attention mask) is shared by every layer and stays where it is.
    """
    n = len(layers)
    recompute_upto = 0 if mode == "off" else n - min(max(keep_layers, 0), n) if mode == "selective" else n
    offload = mode in ("offload", "selective") and recompute_upto > 0
    offloader = LayerInputOffloader(x.device) if offload else None
    x_bytes = x.numel() * x.element_size()
    if keep_attention == "off" or not halves_fit_host(recompute_upto, x_bytes, True, keep_qkv):
        keep_qkv = 0.0
    if keep_attention != "off" and not halves_fit_host(recompute_upto, x_bytes, kept_attention=True):
        keep_attention = "off"
    halves = halves_fit_host(recompute_upto, x_bytes)
    # whole-layer recompute: the layers past what the host holds keep their input on the device
    on_host = host_input_layers(recompute_upto, x_bytes)
    share, inter = gate_up
    k = 0 if offloader is None else host_gate_up_count(
        recompute_upto, share, x_bytes, 2 * x_bytes // x.shape[-1] * inter,
        kept_attention=keep_attention != "off", kept_qkv=keep_qkv)
    on_device = max(0, min(device_gate_up, recompute_upto)) if offloader is not None else 0
    keep_gate_up = {i: "host" for i in spread(recompute_upto, k)}
    keep_gate_up.update({i: "device" for i in range(recompute_upto - on_device, recompute_upto)})
    for i, layer in enumerate(layers):
        if i >= recompute_upto:
            x = run(layer, x, i)
        elif offloader is None:
            x = checkpoint(run, layer, x, i, use_reentrant=False)
        elif halves and getattr(layer, "recompute_in_halves", lambda: False)():
            offloader.layer, offloader.resident = i, i == recompute_upto - 1
            anchors = [p for p in layer.parameters() if p.requires_grad]
            with offloader.hooks():
                x = LayerRecompute.apply(x, layer, attn_args, keep_gate_up.get(i, ""), keep_attention,
                                         keep_qkv > 0, *anchors)
        else:
            offloader.layer, offloader.resident = i, i == recompute_upto - 1 or i >= on_host
            with offloader.hooks():
                x = checkpoint(run, layer, x, i, use_reentrant=False)
    return x
