"""Training micro-steps replayed as CUDA graphs (`train.step_graph`) and what makes the replays exact: the
batches as a capture takes them (`graph_rows`), the pinned block kept while graphs live, the adapters'
compute-dtype copy remade in place, the loss over every row while capturing, and default positions that the
attention mask does not read.

The replay itself needs a GPU (marked `gpu`); the pieces it relies on are checked here on the CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
from model_cases import make_fused_lora_model, make_model  # noqa: E402

from fasttune.kernels import adapter_cast  # noqa: E402
from fasttune.kernels.cross_entropy import linear_cross_entropy, target_rows  # noqa: E402
from fasttune.memory.pinned import PinnedArena  # noqa: E402
from fasttune.train.flat_params import flat_optimizer  # noqa: E402
from fasttune.train.step_graph import BUCKET, Captured, StepGraph, graph_rows, packed_width, pad_row  # noqa: E402


def test_a_frozen_arena_keeps_its_block():
    """A graph recorded the block's addresses: while frozen it is not replaced, even where a lease asked for
    more (that lease's excess is pinned on its own); once thawed it grows as before."""
    arena = PinnedArena(pin=False)
    arena.reserve(1 << 16)
    block = arena.block
    arena.freeze()
    lease = arena.lease()
    assert lease.take(1 << 15) is not None and lease.take(1 << 16) is None  # past the block: not grown
    arena.end(lease)
    assert arena.need > arena.capacity
    arena.lease()  # a new forward with none live would grow the block here
    assert arena.block is block
    arena.end(arena.live[0])
    arena.thaw()
    arena.reserve(arena.need)
    assert arena.block is not block and arena.capacity >= arena.need


def test_refreshed_copies_keep_their_address_and_follow_the_buffer():
    members = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5))]
    opt = flat_optimizer(torch.optim.SGD, members, lr=0.1)
    a16 = adapter_cast.in_dtype(members[0], torch.bfloat16)
    ptr = a16.data_ptr()
    for p in members:
        p.grad.fill_(1.0)
    opt.step()  # the buffer moves; nothing has asked for the copy since
    stale = a16.clone()
    adapter_cast.refresh_copies()
    assert a16.data_ptr() == ptr  # remade in place: a graph that read it reads the new values
    assert not torch.equal(a16, stale)
    assert torch.equal(a16, members[0].detach().to(torch.bfloat16))
    assert adapter_cast.in_dtype(members[0], torch.bfloat16).data_ptr() == ptr


def test_the_loss_over_every_row_equals_the_loss_over_the_kept_rows():
    """While capturing, the host cannot pick the rows with a target: all run, and the others add nothing."""
    torch.manual_seed(0)
    h = torch.randn(2, 9, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (2, 9))
    y[0, 3:5] = -100
    y[1, -1] = -100
    kept = target_rows(y)
    assert not isinstance(kept, str)
    results = []
    for rows in (kept, "all"):
        h.grad = w.grad = None
        loss, n = linear_cross_entropy(h, w, y, rows=rows)
        loss.backward()
        results.append((loss.detach(), n, h.grad.clone(), w.grad.clone()))
    (l1, n1, dh1, dw1), (l2, n2, dh2, dw2) = results
    assert n1 == n2 == 15
    torch.testing.assert_close(l2, l1)
    torch.testing.assert_close(dh2, dh1)
    torch.testing.assert_close(dw2, dw1)


def test_default_positions_are_not_read_for_the_mask(monkeypatch):
    """Without positions, padding or branches the rows restart nowhere: the mask is causal and the host
    does not read the positions (a sync, which a capture refuses); the loss is that of explicit positions."""
    from fasttune.models import attention

    model = make_fused_lora_model(layers=2)
    ids = torch.randint(0, 97, (2, 12))
    explicit = model(ids, position_ids=torch.arange(12).expand(2, 12), targets=ids).loss_sum
    read = []
    monkeypatch.setattr(attention, "is_packed", lambda p: read.append(p) or False)
    default = model(ids, targets=ids).loss_sum
    assert all(p is None for p in read)
    torch.testing.assert_close(default, explicit)


def test_models_with_dropout_are_not_captured():
    from fasttune.lora.apply import apply_lora
    from fasttune.train.step_graph import capturable

    assert capturable(make_fused_lora_model(layers=1))
    with_dropout = make_model(num_hidden_layers=1)
    apply_lora(with_dropout, r=4, lora_alpha=8, lora_dropout=0.1)
    assert not capturable(with_dropout)
    assert not capturable(torch.nn.Linear(2, 2))


def test_off_the_gpu_every_step_runs_eagerly():
    calls = []
    graph = StepGraph(lambda b: calls.append(b) or b["x"].sum(), [], warmup=0)
    for i in range(3):
        assert graph({"x": torch.full((2,), float(i))}) == 2 * i
    assert len(calls) == 3 and not graph.graphs and graph.replays == 0


class FakeGraph:
    """Stands in for a captured graph on the CPU: a replay runs the step on the static batch."""

    def __init__(self, owner: StepGraph, captured) -> None:
        self.owner, self.captured = owner, captured

    def replay(self) -> None:
        self.captured.out = self.owner.step(self.captured.static)


def test_each_shape_is_captured_after_its_warm_up_and_replayed(monkeypatch):
    ran: list[str] = []
    graph = StepGraph(lambda b: ran.append(b.get("kind", "eager")) or b["x"].sum(), [], warmup=1,
                      min_eager=3, max_graphs=2)

    def capture(batch):
        captured = Captured(None, {"x": batch["x"].clone(), "kind": "replay"}, None)
        captured.graph = FakeGraph(graph, captured)
        return captured

    monkeypatch.setattr(graph, "_on_gpu", lambda batch: True)
    monkeypatch.setattr(graph, "_capture", capture)
    widths = [4, 4, 5, 4, 5, 6, 4, 6, 5]
    sums = [float(graph({"x": torch.full((n,), float(i))})) for i, n in enumerate(widths)]
    # 4 4 5: eager (three eager steps first); 4: captured; 5: captured; 6: eager (its first), then no room
    assert [k[0][0][1] for k in graph.captured] == [(4,), (5,)]
    assert ran == ["eager"] * 3 + ["replay"] * 2 + ["eager"] + ["replay"] + ["eager"] + ["replay"]
    assert graph.replays == 4
    # each replay ran the batch it was given, copied into the static input
    assert sums == [n * float(i) for i, n in enumerate(widths)]


def _row(width: int, value: float) -> dict:
    """A packed row as `graph_rows` hands it on: ids, targets, positions of (1, width), and a scale."""
    return {"input_ids": torch.full((1, width), 7), "targets": torch.full((1, width), 3),
            "position_ids": torch.arange(width)[None], "scale": torch.tensor(value)}


def test_a_narrower_row_borrows_a_wider_graph_then_gets_its_own(monkeypatch):
    """A packed row without a graph of its width replays the narrowest captured one at most SLACK times as
    wide, padded as `graph_rows` pads, `borrow` times; then its width warms up and is captured."""
    ran: list[tuple] = []

    def step(b):
        ran.append((b.get("kind", "eager"), b["input_ids"].shape[1]))
        return (b["targets"] != -100).sum() * b["scale"]

    graph = StepGraph(step, [], warmup=1, min_eager=1, borrow=2, width=packed_width, pad=pad_row)

    def capture(batch):
        captured = Captured(None, {**{k: v.clone() for k, v in batch.items()}, "kind": "replay"}, None)
        captured.graph = FakeGraph(graph, captured)
        return captured

    monkeypatch.setattr(graph, "_on_gpu", lambda batch: True)
    monkeypatch.setattr(graph, "_capture", capture)
    widths = [128, 128, 112, 104, 112, 112, 112, 112, 64]
    outs = [float(graph(_row(w, float(i)), tag="layout")) for i, w in enumerate(widths)]
    # 128: eager, then captured; 112 and 104 (within 1.25 x) borrow it, 112 twice; then 112 runs eagerly and
    # is captured, and replays its own; 64 is too narrow to borrow and runs eagerly
    assert ran == [("eager", 128), ("replay", 128), ("replay", 128), ("replay", 128), ("replay", 128),
                   ("eager", 112), ("replay", 112), ("replay", 112), ("eager", 64)]
    assert graph.padded == 3 and graph.replays == 6 and [k[0][0][1] for k in graph.captured] == [(1, 128),
                                                                                               (1, 112)]
    # each step counted the batch's own targets: the padding has none
    assert outs == [w * float(i) for i, w in enumerate(widths)]
    # another tag (layout) or a batch that may not be padded borrows nothing
    graph({**_row(100, 1.0)}, tag="other")
    assert graph.padded == 3
    graph({"input_ids": torch.zeros(2, 100), "targets": torch.zeros(2, 100), "scale": torch.tensor(1.0)})
    assert graph.padded == 3
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # close() waits for the device
    graph.close()
    graph(_row(100, 1.0), tag="layout")  # the graphs are gone: nothing to borrow
    assert graph.padded == 3 and ran[-1] == ("eager", 100)


def test_pad_row_continues_the_last_row_and_keeps_the_rest():
    row = {"input_ids": torch.tensor([[5, 6, 7]]), "targets": torch.tensor([[6, 7, -100]]),
           "position_ids": torch.tensor([[0, 0, 1]]), "scale": torch.tensor(0.5)}
    out = pad_row(row, 6)
    assert out["input_ids"].tolist() == [[5, 6, 7, 0, 0, 0]]
    assert out["targets"].tolist() == [[6, 7, -100, -100, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 0, 1, 2, 3, 4]]
    assert out["scale"] is row["scale"] and pad_row(row, 3) is row
    assert packed_width(row) == 3
    assert packed_width({"input_ids": torch.zeros(2, 3), "position_ids": 0}) is None  # two rows
    assert packed_width({"input_ids": torch.zeros(1, 3)}) is None  # default positions


def _run(model, opt, batches, graphed: bool):
    params = [p for p in model.parameters() if p.requires_grad]

    def step(batch):
        out = model(batch["input_ids"], targets=batch["targets"])
        loss = out.loss_sum / out.n_tokens
        loss.backward()
        return loss.detach()

    run = StepGraph(step, params, warmup=2) if graphed else step
    losses = []
    for batch in batches:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = run(batch)
        losses.append(float(loss))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return losses, run


def _model(nf4: bool):
    """The tiny fused LoRA model on the GPU; `nf4`: its base quantised to NF4 first (QLoRA)."""
    if not nf4:
        return make_fused_lora_model(layers=3).cuda()
    pytest.importorskip("bitsandbytes")
    from fasttune.lora.apply import apply_lora
    from fasttune.models.quantize import quantize_linears

    model = make_model(num_hidden_layers=3).train()
    quantize_linears(model, "4bit", "cuda", torch.bfloat16)
    model.cuda()
    apply_lora(model, r=4, lora_alpha=8)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.1)
    model.set_use_kernels(True)
    return model


@pytest.mark.gpu
@pytest.mark.parametrize("mode,nf4", [("offload", False), ("on", False), ("off", False), ("offload", True)])
def test_replayed_steps_train_as_eager_steps(mode, nf4):
    """On the GPU: the same batches through eager steps and through a captured, replayed step (the
    optimiser stepping the adapters between them) give the same losses and the same adapters; the
    graph's replays are what ran after the warm-up."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.manual_seed(0)
    batches = []
    for _ in range(6):
        ids = torch.randint(0, 97, (2, 64), device="cuda")
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        targets[0, :7] = -100  # a masked prompt: rows without a target run through the loss while captured
        batches.append({"input_ids": ids, "targets": targets})
    results = []
    for graphed in (False, True):
        model = _model(nf4)
        model.set_gradient_checkpointing(mode)
        params = [p for p in model.parameters() if p.requires_grad]
        opt = flat_optimizer(torch.optim.AdamW, params, lr=1e-2)
        losses, run = _run(model, opt, batches, graphed)
        trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((losses, trained))
        if graphed:
            assert run.replays == len(batches) - 2
            run.close()
    (eager, eager_p), (replayed, replayed_p) = results
    assert eager[0] != eager[-1]  # the adapters moved, so stale copies in the graph would show
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(eager), rtol=2e-3, atol=2e-3)
    for name, p in eager_p.items():
        torch.testing.assert_close(replayed_p[name], p, rtol=2e-3, atol=2e-3, msg=name)


def test_graph_rows_takes_rows_without_padding_as_they_are():
    ids = torch.arange(12).view(2, 6)
    t = ids.clone()
    ones, pos = torch.ones(2, 6, dtype=torch.long), torch.arange(6).expand(2, 6)
    plain, layout = graph_rows({"input_ids": ids, "targets": t, "attention_mask": ones, "position_ids": pos})
    assert set(plain) == {"input_ids", "targets"} and plain["input_ids"] is ids and not layout.packed
    many = torch.arange(6).repeat(2, 6)[:, :36] % 2  # 18 rows of 2 in each of 2 sequences: 36 rows
    assert graph_rows({"input_ids": many, "targets": many})[1].packed is False  # no positions: not packed
    rows, layout = graph_rows({"input_ids": many, "targets": many, "position_ids": many})
    assert rows["position_ids"] is many and layout.packed and layout.max_rows == 64


def test_graph_rows_leaves_large_micro_batches_to_run_eagerly():
    from fasttune.train.step_graph import MAX_TOKENS

    ids = torch.zeros(2, MAX_TOKENS // 2, dtype=torch.long)
    assert graph_rows({"input_ids": ids, "targets": ids}) is not None
    wide = torch.zeros(2, MAX_TOKENS // 2 + 8, dtype=torch.long)
    assert graph_rows({"input_ids": wide, "targets": wide}) is None
    mask = torch.ones_like(wide)
    mask[1, -16:] = 0  # padded: the real tokens fit
    assert graph_rows({"input_ids": wide, "targets": wide, "attention_mask": mask})[0]["input_ids"].shape == (
        1, MAX_TOKENS)


def test_graph_rows_refuses_what_it_cannot_run_exactly():
    ids = torch.arange(12).view(2, 6)
    t = ids.clone()
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0
    left = mask.flip(1)
    assert graph_rows({"input_ids": ids, "targets": t, "attention_mask": left}) is None
    late = torch.arange(6).expand(2, 6) + 1  # a row not beginning at position 0 would join the row before it
    assert graph_rows({"input_ids": ids, "targets": t, "attention_mask": mask, "position_ids": late}) is None
    assert graph_rows({"input_ids": ids, "targets": t, "branch": mask}) is None
    assert graph_rows({"input_ids": ids}) is None


@pytest.mark.parametrize("packing", [False, True])
def test_graph_rows_runs_a_padded_batch_as_its_real_tokens(packing):
    """A collated, right-padded batch becomes one packed row of its real tokens padded to a multiple of
    BUCKET, whose loss and adapter gradients through our model are the padded batch's; and so are those of
    the row padded further, as it runs in a wider graph (`pad_row`)."""
    from fasttune.data.packing import collate, shift_targets

    g = torch.Generator().manual_seed(0)
    lengths = [9, 4, 13, 6]
    input_ids = [torch.randint(0, 97, (n,), generator=g).tolist() for n in lengths]
    targets = [shift_targets(r) for r in input_ids]
    targets[1][:2] = [-100, -100]  # a masked prompt
    layout_of_batch = [[0, 1], [2, 3]] if packing else [[0], [2]]
    batch = collate(layout_of_batch, input_ids, targets, pad_id=0, max_seq_length=32)
    assert not bool(batch["attention_mask"].bool().all())
    rows, layout = graph_rows(batch)
    n = int(batch["attention_mask"].sum())
    assert rows["input_ids"].shape == (1, BUCKET) and n < BUCKET
    assert layout.packed and layout.max_rows == 32
    assert int((rows["position_ids"] == 0).sum()) == sum(len(s) for s in layout_of_batch)
    model = make_fused_lora_model(layers=2)
    results = []
    for b in (batch, rows, pad_row(rows, BUCKET + BUCKET // 4)):
        model.zero_grad(set_to_none=True)
        out = model(**b)
        out.loss_sum.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((out.loss_sum.detach(), int(out.n_tokens), grads))
    (l1, n1, g1) = results[0]
    for l2, n2, g2 in results[1:]:
        assert n1 == n2 > 0
        torch.testing.assert_close(l2, l1, rtol=1e-5, atol=1e-5)
        for k in g1:
            torch.testing.assert_close(g2[k], g1[k], rtol=1e-4, atol=1e-6, msg=k)


# real tokens of the two rows of each `uneven` micro-batch: run as packed rows of 384 or 320 tokens
UNEVEN = [(190, 180), (185, 190), (150, 140), (190, 170), (140, 150), (150, 150), (180, 190), (145, 150),
          (190, 190), (140, 150)]


class FixedRows:
    """Endless micro-batches of 2 x 48 random tokens, seeded by their index: `plain` rows, or `packed` (rows
    of a random length each, positions restarting, the tail padded as `data.packing.collate` pads), or
    `uneven`: 2 x 192 with the rows of `UNEVEN` right-padded."""

    def __init__(self, kind: str) -> None:
        self.i, self.kind = 0, kind

    def __next__(self):
        g = torch.Generator().manual_seed(self.i)
        self.i += 1
        if self.kind == "uneven":
            ids = torch.randint(1, 97, (2, 192), generator=g)
            targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
            mask = torch.ones_like(ids)
            for b, n in enumerate(UNEVEN[(self.i - 1) % len(UNEVEN)]):
                ids[b, n:], mask[b, n:] = 0, 0
                targets[b, n - 1:] = -100
            return {"input_ids": ids, "targets": targets, "attention_mask": mask}
        ids = torch.randint(0, 97, (2, 48), generator=g)
        targets = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
        targets[self.i % 2, :5] = -100
        batch = {"input_ids": ids, "targets": targets, "attention_mask": torch.ones_like(ids)}
        if self.kind == "packed":
            pos = torch.empty_like(ids)
            for b in range(2):
                j = 0
                while j < 40:
                    n = min(int(torch.randint(3, 15, (), generator=g)), 40 - j)
                    pos[b, j:j + n] = torch.arange(n)
                    targets[b, j + n - 1] = -100  # no target across a row's end
                    j += n
                pos[b, 40:] = torch.arange(pos[b, 39] + 1, pos[b, 39] + 9)
            targets[:, 40:] = -100
            batch["attention_mask"][:, 40:] = 0
            batch["position_ids"] = pos
        return batch

    def __len__(self) -> int:
        return 1000

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state) -> None:
        self.i = state["i"]


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["plain", "packed", "uneven"])
def test_the_loop_replays_its_micro_step_and_trains_as_eagerly(kind, tmp_path, monkeypatch):
    """On the GPU: `train_loop` with cuda_graph auto captures the micro-step of plain or packed, padded rows
    after its warm-up and gives the losses and adapters of cuda_graph off (which runs packed rows through
    the padding-free path, their padding left out); `uneven` rows of 320 tokens replay the graph of 384."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from fasttune.config import TrainConfig
    from fasttune.run_dir import RunDir
    from fasttune.train import loop
    from fasttune.train.loop import train_loop
    from fasttune.train.metrics import read_metrics

    made = []
    choose = loop.step_graph
    monkeypatch.setattr(loop, "step_graph", lambda *a, **kw: made.append(choose(*a, **kw)) or made[-1])
    runs = {}
    for mode in ("off", "auto"):
        model = make_fused_lora_model(layers=3).cuda()
        model.set_gradient_checkpointing("offload")
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        cfg = TrainConfig(per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=5,
                          learning_rate=1e-2, warmup_steps=0, logging_steps=1, save_steps=0, cuda_graph=mode)
        lines: list[str] = []
        train_loop(model, params, FixedRows(kind), cfg, tmp_path / mode, device=torch.device("cuda"),
                   precision="bf16", log=lines.append)
        losses = [r["loss"] for r in read_metrics(RunDir(tmp_path / mode).metrics) if r["kind"] == "train"]
        runs[mode] = (losses, {n: p.detach().clone() for n, p in params.items()}, lines)
    (eager, eager_p, eager_log), (replayed, replayed_p, log) = runs["off"], runs["auto"]
    assert any("captured" in line for line in log) and not any("CUDA graph" in line for line in eager_log)
    assert made[0] is None and made[1].graph.replays > 0
    if kind == "uneven":
        assert made[1].graph.padded == 4 and len(made[1].graph.captured) == 1
    assert len(eager) == 5 and eager[0] != eager[-1]
    torch.testing.assert_close(torch.tensor(replayed), torch.tensor(eager), rtol=2e-3, atol=2e-3)
    for name, p in eager_p.items():
        torch.testing.assert_close(replayed_p[name], p, rtol=2e-3, atol=2e-3, msg=name)


@pytest.mark.parametrize("ending", ["done", "interrupted"])
def test_the_loop_lets_its_graphs_go_however_the_run_ends(ending, tmp_path, monkeypatch):
    """The graphs' memory and the pinned block they froze go back when the run ends, and when it stops on
    an exception (a notebook's interrupt keeps the loop's frame alive in the traceback, and a frozen block
    would never grow for the next run). The graph runs eagerly here (the CPU); `step_graph` is the loop's
    choice of it, made to choose it here."""
    from fasttune.config import TrainConfig
    from fasttune.train import loop
    from fasttune.train.step_graph import MicroStepGraph

    made: list[MicroStepGraph] = []
    closed: list[int] = []

    class Counted(MicroStepGraph):
        def close(self) -> None:
            closed.append(self.graph.replays)
            super().close()

    def choose(cfg, model, objective, precision, device, params, log, eligible):
        made.append(Counted(model, objective, precision, device, params, log))
        return made[-1]

    monkeypatch.setattr(loop, "step_graph", choose)

    def stop_at_step_2(rec):
        if ending == "interrupted" and rec.get("step") == 2:
            raise KeyboardInterrupt

    model = make_fused_lora_model(layers=1)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    cfg = TrainConfig(per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2, warmup_steps=0,
                      logging_steps=1, save_steps=0)

    def run():
        loop.train_loop(model, params, FixedRows("plain"), cfg, tmp_path, device=torch.device("cpu"),
                        precision="fp32", log=lambda line: None, on_record=stop_at_step_2)

    if ending == "interrupted":
        with pytest.raises(KeyboardInterrupt):
            run()
    else:
        run()
    assert len(made) == 1 and len(closed) == 1  # closed once, at the end, whichever way it came
