"""A training micro-step captured once as a CUDA graph and replayed for every batch of its shape.

At a few thousand tokens a micro-batch the GPU finishes a layer's kernels faster than the host queues them:
the step is bound by Python and launch overhead, not by the GPU. A CUDA graph records the launches of one
forward and backward (every kernel, copy and stream dependency, the offloader's copies to and from pinned
host memory among them) and replays them with one call.

What a replay needs, and how `StepGraph` provides it:
- Fixed shapes and addresses: the batch is copied into static input tensors, and the graph's outputs are
  static tensors, overwritten by the next replay (read them before it).
- No host reads of GPU values inside the step: while capturing, the model decides nothing from the batch's
  values on the host. The loss runs every row (`kernels.cross_entropy`), default positions are not read
  (`models.llama`), and whether rows are packed and the size of their row table come from the batch's host
  copy (`graph_rows`, `models.capture`). Padding is computed as part of the last row; a batch that needs a
  read the capture cannot make runs eagerly.
- Gradients accumulate into `.grad` tensors that exist before the capture and are zeroed in place
  (`train.flat_params`), so each replay adds its micro-batch's gradient as an eager backward would.
- What the graph reads outside its own memory stays put: the adapters' compute-dtype copy is remade in
  place before each replay (`kernels.adapter_cast.refresh_copies`), the pinned slices the offloader wrote
  stay leased to the graph (`memory.pinned.Hold`), and the kernels' scratch is let go before the capture so
  that the graph allocates its own.
- Warm-up: `warmup` batches of one shape in a row run eagerly (Triton compiles, the memory plan and the
  pinned block settle); the next of that shape is captured and replayed. One shape is captured at a time: a
  batch of another shape lets the graph and its memory go, runs eagerly, and the count starts again, so
  rows of changing widths run as before, without a graph's memory beside them.

The optimiser step stays outside the graph (bitsandbytes' 8-bit step reads its own state on the host).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence

import torch

from fasttune.kernels.adapter_cast import refresh_copies
from fasttune.kernels.scratch import release_scratch
from fasttune.memory.pinned import arena
from fasttune.models.capture import BatchLayout, batch_layout

Batch = dict[str, torch.Tensor]


def _key(batch: Batch) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(batch.items()))


class StepGraph:
    """`step(batch)` (forward and backward, returning tensors) run eagerly until `warmup` batches in a row
    had one shape, then captured and replayed for the batches of that shape (module docstring). A batch of
    another shape lets the graph go and runs eagerly, and the count starts again: a graph's memory is held
    only while its shape lasts, never beside the eager steps of other shapes. `params`: the trainable
    tensors, whose `.grad` must exist when the capture begins. A capture that fails raises, or with
    `fallback` (not for running out of memory) leaves every batch to run eagerly, `failed` saying why.
    Call `close()` (or drop the object) to let the graph's memory go.
    """

    def __init__(self, step: Callable[[Batch], object], params: Sequence[torch.Tensor], warmup: int = 2,
                 fallback: bool = False) -> None:
        self.step, self.params, self.warmup, self.fallback = step, list(params), warmup, fallback
        self.failed: str | None = None  # why the capture failed; every batch then runs eagerly
        self.last_key: tuple | None = None  # the shape of the last batch, and how many in a row had it
        self.streak = 0
        self.key: tuple | None = None  # the captured shape
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Batch = {}
        self.out: object = None
        self.hold = None
        self.replays = 0

    def __call__(self, batch: Batch, tag: Hashable = None) -> object:
        """`tag`: what else tells batches of one shape apart (a captured step replays only its own)."""
        key = (_key(batch), tag)
        if self.graph is not None and key == self.key:
            for k, v in batch.items():
                self.static[k].copy_(v, non_blocking=True)
            refresh_copies()
            self.graph.replay()
            self.replays += 1
            return self.out
        if self.graph is not None:  # the shapes have moved on: the graph's memory goes back
            self.close()
        self.streak = self.streak + 1 if key == self.last_key else 1
        self.last_key = key
        if self.failed or self.streak <= self.warmup or not self._on_gpu(batch):
            return self.step(batch)
        try:
            self._capture(key, batch)
        except Exception as e:  # nothing of this batch has run: it runs eagerly, or the error goes up
            self.failed = f"{type(e).__name__}: {e}"
            release_scratch()  # what the failed capture allocated
            if not self.fallback or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            return self.step(batch)
        self.graph.replay()  # the capture queued nothing: this batch's work
        self.replays += 1
        return self.out

    @staticmethod
    def _on_gpu(batch: Batch) -> bool:
        return all(v.is_cuda for v in batch.values())

    def _capture(self, key: tuple, batch: Batch) -> None:
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise RuntimeError(f"StepGraph: {len(missing)} trainable tensors have no .grad to accumulate "
                               "into (the gradients must exist before the capture and be zeroed in place)")
        device = next(iter(batch.values())).device
        torch.cuda.synchronize(device)
        refresh_copies()
        release_scratch()  # the graph makes its own: a block freed while capturing must not be one eager owns
        self.static = {k: v.clone() for k, v in batch.items()}
        graph = torch.cuda.CUDAGraph()
        hold = arena(device).hold()
        try:
            with torch.cuda.graph(graph):
                out = self.step(self.static)
        except Exception:
            hold.release()
            self.static = {}
            raise
        finally:
            hold.close()
        self.graph, self.key, self.out, self.hold = graph, key, out, hold

    def key_shape(self) -> tuple[int, ...]:
        """The captured batch's (B, T)."""
        return tuple(self.static["input_ids"].shape)

    def close(self) -> None:
        """Let the graph, its memory and its pinned slices go (after the device has finished with them)."""
        if self.graph is None:
            return
        torch.cuda.synchronize()
        self.graph = self.out = None
        self.static = {}
        if self.hold is not None:
            self.hold.release()
            self.hold = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # the CUDA context may be gone at exit
            pass


def graph_rows(batch: Batch) -> tuple[Batch, BatchLayout] | None:
    """`batch` (its host copy) as a captured step takes it, and its layout (`models.capture`); None for a
    batch it does not take, which runs eagerly. Right padding whose positions continue the last row's (as
    `data.packing.collate` pads) is computed as part of that row: no real token attends to it and it has no
    target, so the mask can go. Positions 0 .. T-1 go too (the default); packed rows keep theirs, and the
    layout's row table holds the next power of two of their count, at least 32."""
    if not set(batch) <= {"input_ids", "targets", "position_ids", "attention_mask"} or "targets" not in batch:
        return None
    ids = batch["input_ids"]
    if ids.device.type != "cpu" or ids.dim() != 2:
        return None  # reading a device copy would be the sync the graph avoids
    B, T = ids.shape
    mask, pos = batch.get("attention_mask"), batch.get("position_ids")
    if mask is not None and not bool(mask.bool().all()):
        pad = ~mask.bool()
        if bool((pad[:, :-1] & ~pad[:, 1:]).any()):  # a real token after padding: not right padding
            return None
        if pos is not None and bool((pad[:, 1:] & (pos[:, 1:] != pos[:, :-1] + 1)).any()):
            return None  # padding that begins a row of its own
    out = {"input_ids": ids, "targets": batch["targets"]}
    if pos is None or torch.equal(pos, torch.arange(T).expand(B, T)):
        return out, BatchLayout(packed=False)
    out["position_ids"] = pos
    rows = B + int((pos[:, 1:] == 0).sum())
    if rows == B:
        return out, BatchLayout(packed=False)
    return out, BatchLayout(packed=True, max_rows=max(32, 1 << (rows - 1).bit_length()))


class MicroStepGraph:
    """The training loop's micro-step (SFT: the model's summed token loss, scaled by the window's share, then
    its backward) through a `StepGraph` for the batches `graph_rows` takes. `__call__(batch, scale)` returns
    the batch's loss sum (a static tensor: read or add it before the next call) and its (empty) metrics."""

    def __init__(self, model: torch.nn.Module, objective, precision: str, device: torch.device,
                 params: Sequence[torch.Tensor], log: Callable[[str], None]) -> None:
        from fasttune.train.precision import autocast

        self.log, self.logged = log, False
        self.layout = BatchLayout(packed=False)

        def micro(batch: Batch):
            inputs = {k: v for k, v in batch.items() if k != "scale"}
            with autocast(precision, device), batch_layout(self.layout):
                batch_loss, stats = objective(model, inputs)
            (batch_loss.float() * batch["scale"]).backward()
            return batch_loss.detach().float(), stats

        self.graph = StepGraph(micro, params, fallback=True)

    def __call__(self, batch: Batch, layout: BatchLayout, scale: float):
        device = batch["input_ids"].device
        self.layout = layout
        scale_t = torch.full((), scale, dtype=torch.float32, device=device)
        out = self.graph({**batch, "scale": scale_t}, layout)
        if not self.logged and self.graph.graph is not None:
            self.logged = True
            B, T = self.graph.key_shape()
            self.log(f"CUDA graph: the forward and backward of {B} x {T} micro-batches are captured and "
                     "replayed from now on (cuda_graph: off runs them eagerly)")
        elif not self.logged and self.graph.failed:
            self.logged = True
            self.log(f"CUDA graph: the capture failed, the steps run eagerly ({self.graph.failed[:300]})")
        return out
