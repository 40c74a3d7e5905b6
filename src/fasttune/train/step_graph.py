"""Training micro-steps captured as CUDA graphs, one per batch shape, and replayed.

At a few thousand tokens a micro-batch the GPU finishes a layer's kernels faster than the host queues them:
the step is bound by Python and launch overhead, not by the GPU. A CUDA graph records the launches of one
forward and backward (every kernel, copy and stream dependency, the offloader's copies to and from pinned
host memory among them) and replays them with one call.

What a replay needs, and how `StepGraph` provides it:
- Fixed shapes and addresses: the batch is copied into static input tensors, and the graph's outputs are
  static tensors, overwritten by the next call (read them before it).
- No host reads of GPU values inside the step: while capturing, the model decides nothing from the batch's
  values on the host. The loss runs every row (`kernels.cross_entropy`), default positions are not read
  (`models.llama`), and whether rows are packed and the size of their row table come from the batch's host
  copy (`graph_rows`, `models.capture`).
- Few shapes: `graph_rows` runs a padded batch as what the padding-free path runs, the real tokens of every
  row in one packed row, padded up to a multiple of `BUCKET` tokens with padding that continues the last row
  (no real token attends to it, it has no target), so uneven rows share a few shapes.
- Gradients accumulate into `.grad` tensors that exist before the capture and are zeroed in place
  (`train.flat_params`), so each replay adds its micro-batch's gradient as an eager backward would.
- What the graphs read outside their own memory stays put: the adapters' compute-dtype copy is remade in
  place before each replay (`kernels.adapter_cast.refresh_copies`), the pinned block the offloader's copies
  use is not replaced while a graph lives (`memory.pinned.PinnedArena.freeze`), and the kernels' scratch is
  let go before each capture so that the graphs allocate their own.
- Warm-up: each shape runs eagerly `warmup` times (Triton compiles and tunes, the memory plan and the pinned
  block settle), and nothing is captured before `min_eager` eager steps in all; the next batch of the shape
  is captured and replayed. The graphs share one memory pool: they never run at once, so the memory they
  hold is about one step's, not one per shape.
- Borrowed graphs: a capture costs about an eager step, and repays it only if its shape comes again. A
  packed row narrower than a captured one of the same layout by at most `SLACK` is padded to that width
  (`pad_row`, as `graph_rows` pads) and replayed there, `borrow` times; after that its width is warmed up
  and captured as any other. Short uneven runs (the notebook's 60 steps) meet few widths twice; long runs
  end with a graph for each width they use often.

The optimiser step stays outside the graphs (bitsandbytes' 8-bit step reads its own state on the host).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from fasttune.kernels._dispatch import next_pow2
from fasttune.kernels.adapter_cast import refresh_copies
from fasttune.kernels.scratch import release_scratch
from fasttune.memory.pinned import arena
from fasttune.models.base import IGNORE_INDEX
from fasttune.models.capture import BatchLayout, batch_layout

Batch = dict[str, torch.Tensor]
BUCKET = 64  # tokens: a padded batch runs as one packed row of a multiple of this many (`graph_rows`)
# tokens: a larger micro-batch runs eagerly; past it the step is the GPU's time rather than the host's, and a
# graph would gain little for the memory it holds
MAX_TOKENS = 8192
SLACK = 1.25  # a packed row runs in a captured graph up to this many times its width (`StepGraph` borrow)


def _key(batch: Batch) -> tuple:
    return tuple((k, tuple(v.shape), v.dtype, v.device) for k, v in sorted(batch.items()))


def _family(key: tuple) -> tuple:
    """A shape key without its tensors' last dimension: the same for batches that differ in width only."""
    fields, tag = key
    return tuple((k, shape[:-1], dtype, device) for k, shape, dtype, device in fields), tag


@dataclass
class Captured:
    graph: torch.cuda.CUDAGraph
    static: Batch  # the inputs it reads
    out: object  # the outputs it writes


class StepGraph:
    """`step(batch)` (forward and backward, returning tensors) run eagerly for the first `warmup` batches of
    each shape (and until `min_eager` eager steps in all), then captured and replayed for the batches of
    that shape, up to `max_graphs` shapes (module docstring). `tag`: what else tells batches apart.
    `params`: the trainable tensors, whose `.grad` must exist when a capture begins. A capture that fails
    raises, or with `fallback` (not for running out of memory) leaves every batch to run eagerly, `failed`
    saying why. `close()` (or dropping the object) lets the graphs and their memory go.
    `width(batch)`: the width `pad(batch, wider)` may pad it from (every tensor of one or more dimensions
    that wide in its last), or None where it may not be padded; such a batch without a graph of its own
    replays the narrowest captured one of its family (the same tag, other dimensions and dtypes) at most
    `SLACK` times as wide, up to `borrow` times (module docstring).
    """

    def __init__(self, step: Callable[[Batch], object], params: Sequence[torch.Tensor], warmup: int = 1,
                 min_eager: int = 2, max_graphs: int = 48, fallback: bool = False,
                 width: Callable[[Batch], int | None] | None = None,
                 pad: Callable[[Batch, int], Batch] | None = None, borrow: int = 8) -> None:
        self.step, self.params, self.fallback = step, list(params), fallback
        self.warmup, self.min_eager, self.max_graphs = warmup, min_eager, max_graphs
        self.width, self.pad, self.borrow = width, pad, borrow
        self.graphs: dict[tuple, Captured] = {}
        self.seen: dict[tuple, int] = {}  # eager runs of each shape
        self.widths: dict[tuple, dict[int, tuple]] = {}  # captured widths of each family: width -> key
        self.borrowed: dict[tuple, int] = {}  # runs of each shape in a wider graph
        self.padded = 0  # replays of a wider graph
        self.eager = 0
        self.pool = None  # the graphs' shared memory pool
        self.frozen = None  # the pinned arena kept while graphs live
        self.failed: str | None = None
        self.replays = 0
        self.captured: list[tuple] = []  # the keys captured, in order

    def __call__(self, batch: Batch, tag: Hashable = None) -> object:
        key = (_key(batch), tag)
        captured = self.graphs.get(key)
        if captured is not None:
            return self._replay(captured, batch)
        wider = self._wider(batch, key)
        if wider is not None:
            self.borrowed[key] = self.borrowed.get(key, 0) + 1
            self.padded += 1
            return self._replay(self.graphs[wider[1]], self.pad(batch, wider[0]))
        runs = self.seen.get(key, 0)
        if (self.failed or runs < self.warmup or self.eager < self.min_eager
                or len(self.graphs) >= self.max_graphs or not self._on_gpu(batch)):
            self.seen[key] = runs + 1
            self.eager += 1
            return self.step(batch)
        try:
            captured = self._capture(batch)
        except Exception as e:  # nothing of this batch has run: it runs eagerly, or the error goes up
            self.failed = f"{type(e).__name__}: {e}"
            release_scratch()  # what the failed capture allocated
            if not self.fallback or isinstance(e, torch.cuda.OutOfMemoryError):
                raise
            self.eager += 1
            return self.step(batch)
        self.graphs[key] = captured
        self.captured.append(key)
        width = self.width(batch) if self.width is not None else None
        if width is not None:
            self.widths.setdefault(_family(key), {})[width] = key
        captured.graph.replay()  # the capture queued nothing: this batch's work
        self.replays += 1
        return captured.out

    def _wider(self, batch: Batch, key: tuple) -> tuple[int, tuple] | None:
        """The narrowest captured graph this batch may borrow (class docstring): (its width, its key)."""
        if self.width is None or self.borrowed.get(key, 0) >= self.borrow:
            return None
        width = self.width(batch)
        if width is None:
            return None
        fits = [w for w in self.widths.get(_family(key), ()) if width < w <= width * SLACK]
        return (min(fits), self.widths[_family(key)][min(fits)]) if fits else None

    def _replay(self, captured: Captured, batch: Batch) -> object:
        for k, v in batch.items():
            captured.static[k].copy_(v, non_blocking=True)
        refresh_copies()
        captured.graph.replay()
        self.replays += 1
        return captured.out

    @staticmethod
    def _on_gpu(batch: Batch) -> bool:
        return all(v.is_cuda for v in batch.values())

    def _capture(self, batch: Batch) -> Captured:
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise RuntimeError(f"StepGraph: {len(missing)} trainable tensors have no .grad to accumulate "
                               "into (the gradients must exist before the capture and be zeroed in place)")
        device = next(iter(batch.values())).device
        torch.cuda.synchronize(device)
        pinned = arena(device)
        if pinned.need > pinned.capacity:  # this shape's copies need a larger block: the graphs of the old go
            self.close()
            pinned.reserve(pinned.need)
        refresh_copies()
        release_scratch()  # the graph makes its own: a block freed while capturing must not be one eager owns
        static = {k: v.clone() for k, v in batch.items()}
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self.step(static)
        if self.frozen is None:
            pinned.freeze()
            self.frozen = pinned
        return Captured(graph, static, out)

    def close(self) -> None:
        """Let the graphs and their memory go (after the device has finished with them)."""
        if self.graphs:
            torch.cuda.synchronize()
        self.graphs.clear()
        self.widths.clear()
        self.pool = None
        if self.frozen is not None:
            self.frozen.thaw()
            self.frozen = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # the CUDA context may be gone at exit
            pass


def capturable(model: torch.nn.Module) -> bool:
    """Whether `train_loop` may capture this model's steps: our Llama model (`supports_step_graph`) without
    dropout (a layer rerun for its backward must draw its forward's dropout mask again, which replays are not
    checked to do)."""
    if not getattr(model, "supports_step_graph", False):
        return False
    return not any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def row_table(rows: int) -> int:
    """The packed-row table's size for `rows` rows: the next power of two, at least 32."""
    return max(32, next_pow2(rows))


def graph_rows(batch: Batch) -> tuple[Batch, BatchLayout] | None:
    """`batch` (its host copy) as a captured step runs it, and its layout (`models.capture`); None for a batch
    it does not take, which runs eagerly. Rows without padding run as they are (positions 0 .. T-1 dropped:
    the default). A right-padded batch runs as the padding-free path runs it (`models.padding_free`): the
    real tokens of every row in one packed row, in order, then padding up to a multiple of `BUCKET` tokens
    whose positions continue the last row's, with no target. Micro-batches of more than `MAX_TOKENS` tokens
    (as run) run eagerly."""
    if not set(batch) <= {"input_ids", "targets", "position_ids", "attention_mask"} or "targets" not in batch:
        return None
    ids, targets = batch["input_ids"], batch["targets"]
    if ids.device.type != "cpu" or ids.dim() != 2:
        return None  # reading a device copy would be the sync the graph avoids
    B, T = ids.shape
    mask, pos = batch.get("attention_mask"), batch.get("position_ids")
    default = torch.arange(T).expand(B, T)
    if pos is None:
        pos = default
    if mask is None or bool(mask.bool().all()):
        if B * T > MAX_TOKENS:
            return None
        out = {"input_ids": ids, "targets": targets}
        rows = B + int((pos[:, 1:] == 0).sum())
        if rows == B and (pos is default or torch.equal(pos, default)):
            return out, BatchLayout(packed=False)
        out["position_ids"] = pos
        return out, BatchLayout(packed=rows > B, max_rows=row_table(rows) if rows > B else 0)
    real = mask.bool()
    if bool((~real[:, :-1] & real[:, 1:]).any()):  # a real token after padding: not right padding
        return None
    filled = real[:, 0]
    if bool((pos[filled, 0] != 0).any()):  # a row that does not begin at position 0 would join the one before
        return None
    n = int(real.sum())
    width = -(-n // BUCKET) * BUCKET
    if width > MAX_TOKENS:
        return None
    flat = {"input_ids": ids[real][None], "targets": targets[real][None], "position_ids": pos[real][None]}
    rows = int((flat["position_ids"] == 0).sum())
    return pad_row(flat, width), BatchLayout(packed=rows > 1, max_rows=row_table(rows) if rows > 1 else 0)


def pad_row(batch: Batch, width: int) -> Batch:
    """One packed row (`input_ids`, `targets`, `position_ids` of shape (1, w); anything else is kept) padded
    to `width` tokens: token 0, no target, positions continuing the last row's, so that no real token
    attends to the padding and the loss and gradients are the row's."""
    n = width - batch["input_ids"].shape[1]
    if n == 0:
        return batch
    ids, targets, pos = batch["input_ids"], batch["targets"], batch["position_ids"]
    last = pos[:, -1:] if pos.shape[1] else pos.new_full((1, 1), -1)
    after = last + torch.arange(1, n + 1, dtype=pos.dtype, device=pos.device)
    return {**batch, "input_ids": torch.cat([ids, ids.new_zeros(1, n)], 1),
            "targets": torch.cat([targets, targets.new_full((1, n), IGNORE_INDEX)], 1),
            "position_ids": torch.cat([pos, after], 1)}


def packed_width(batch: Batch) -> int | None:
    """The width of a batch that `pad_row` may pad (one row with explicit positions), else None."""
    ids = batch["input_ids"]
    return ids.shape[1] if "position_ids" in batch and ids.dim() == 2 and ids.shape[0] == 1 else None


class MicroStepGraph:
    """The training loop's micro-step (SFT: the model's summed token loss, scaled by the window's share, then
    its backward) through a `StepGraph`, for the batches `graph_rows` takes. `__call__(batch, layout, scale)`
    returns the batch's loss sum (a static tensor: read or add it before the next call) and its (empty)
    metrics."""

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

        self.graph = StepGraph(micro, params, fallback=True, width=packed_width, pad=pad_row)

    def __call__(self, batch: Batch, layout: BatchLayout, scale: float):
        device = batch["input_ids"].device
        self.layout = layout
        scale_t = torch.full((), scale, dtype=torch.float32, device=device)
        out = self.graph({**batch, "scale": scale_t}, layout)
        if not self.logged and self.graph.captured:
            self.logged = True
            B, T = batch["input_ids"].shape
            self.log(f"CUDA graph: micro-batches are captured once per shape ({B} x {T} first) and replayed "
                     "(cuda_graph: off runs them eagerly)")
        elif not self.logged and self.graph.failed:
            self.logged = True
            self.log(f"CUDA graph: the capture failed, the steps run eagerly ({self.graph.failed[:300]})")
        return out

    def close(self) -> None:
        self.graph.close()
