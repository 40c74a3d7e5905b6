"""Micro-batch layout: padding, packing, positions, targets, order and resumable position."""

from __future__ import annotations

import random

import pytest
import torch

from fasttune.data.packing import (
    PAD_MULTIPLE,
    BatchStream,
    make_batches,
    pack_bins,
    padded_length,
    plan_epoch,
    shift_targets,
)
from fasttune.data.tokenize import Example

IGN = -100
PAD = 99


def random_examples(n: int, max_len: int, seed: int = 0) -> list[Example]:
    rng = random.Random(seed)
    out = []
    for k in range(n):
        length = rng.randint(2, max_len)
        ids = [rng.randint(100, 999) for _ in range(length)]
        cut = rng.randint(1, length - 1)  # prompt tokens masked
        out.append(Example(input_ids=ids, labels=[IGN] * cut + ids[cut:], row=k + 1))
    return out


def segments(batch: dict[str, torch.Tensor]) -> list[tuple[list[int], list[int]]]:
    """The packed rows of a batch, cut where position_ids restart at 0, real tokens only."""
    rows = []
    for b in range(batch["input_ids"].shape[0]):
        ids, tgt = batch["input_ids"][b], batch["targets"][b]
        pos, mask = batch["position_ids"][b], batch["attention_mask"][b]
        n = int(mask.sum())
        assert mask[:n].all() and not mask[n:].any()  # real tokens first, pads after
        starts = [t for t in range(n) if pos[t] == 0] + [n]
        assert starts[0] == 0
        for a, z in zip(starts, starts[1:]):
            assert pos[a:z].tolist() == list(range(z - a))
            rows.append((ids[a:z].tolist(), tgt[a:z].tolist()))
        # Pads: pad id, no target, positions continuing the last row.
        assert (ids[n:] == PAD).all() and (tgt[n:] == IGN).all()
        assert pos[n:].tolist() == list(range(int(pos[n - 1]) + 1, int(pos[n - 1]) + 1 + len(ids) - n))
    return rows


def test_shift_targets():
    assert shift_targets([IGN, IGN, 5, 6, 2]) == [IGN, 5, 6, 2, IGN]
    assert shift_targets([7]) == [IGN]


def test_padded_length_rounds_to_8_within_max():
    assert [padded_length(n, 512) for n in (1, 8, 9, 17)] == [8, 8, 16, 24]
    assert padded_length(509, 510) == 510 and padded_length(510, 510) == 510


def test_worked_example_from_the_architecture_doc():
    a, b, c, d, eos = 10, 11, 12, 13, 2
    rows = [Example([a, b, eos], [IGN, b, eos]), Example([c, d, eos], [IGN, d, eos])]
    (batch,) = make_batches(rows, batch_size=1, max_seq_length=8, pad_id=PAD, packing=True, seed=0, epoch=0)
    first = batch["input_ids"][0, 0].item()
    order = [0, 1] if first == a else [1, 0]
    want_ids = sum(([[a, b, eos], [c, d, eos]][i] for i in order), []) + [PAD, PAD]
    want_tgt = sum(([[b, eos, IGN], [d, eos, IGN]][i] for i in order), []) + [IGN, IGN]
    assert batch["input_ids"].tolist() == [want_ids]
    assert batch["targets"].tolist() == [want_tgt]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1, 0, 0]]
    assert all(t.dtype == torch.int64 for t in batch.values())


def test_unpacked_rows_are_right_padded_to_a_multiple_of_8():
    rows = random_examples(10, 30)
    batches = make_batches(rows, batch_size=4, max_seq_length=64, pad_id=PAD, packing=False, seed=1, epoch=0)
    assert [b["input_ids"].shape[0] for b in batches] == [4, 4, 2]
    seen = []
    for batch in batches:
        T = batch["input_ids"].shape[1]
        assert T % 8 == 0 and T - 8 < int(batch["attention_mask"].sum(1).max()) <= T
        assert batch["position_ids"].tolist() == [list(range(T))] * batch["input_ids"].shape[0]
        seen += segments(batch)
    want = sorted((e.input_ids, shift_targets(e.labels)) for e in rows)
    assert sorted(seen) == want


@pytest.mark.parametrize("max_len", [16, 64, 100])
def test_packed_segments_reproduce_unpacked_rows(max_len):
    rows = random_examples(57, min(max_len, 40), seed=max_len)
    packed = make_batches(rows, 3, max_len, PAD, packing=True, seed=5, epoch=2)
    unpacked = make_batches(rows, 3, max_len, PAD, packing=False, seed=5, epoch=2)
    seg_packed = sorted(s for b in packed for s in segments(b))
    seg_unpacked = sorted(s for b in unpacked for s in segments(b))
    # Every row appears exactly once, whole (never split), with its own shifted targets.
    assert seg_packed == seg_unpacked == sorted((e.input_ids, shift_targets(e.labels)) for e in rows)
    assert all(b["input_ids"].shape[1] <= max_len for b in packed)
    assert len(packed) < len(unpacked)
    # Trained tokens are the same in both layouts, so the loss sums agree.
    assert sum(int((b["targets"] != IGN).sum()) for b in packed) == \
        sum(int((b["targets"] != IGN).sum()) for b in unpacked)


def test_packing_is_tight():
    lengths = [random.Random(k).randint(1, 200) for k in range(500)]
    bins = pack_bins(lengths, 256, list(range(500)))
    assert sorted(i for b in bins for i in b) == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 256 for b in bins)
    lower_bound = -(-sum(lengths) // 256)
    assert len(bins) <= 1.1 * lower_bound + 1


def test_order_is_seeded_per_epoch():
    lengths = [5 + k % 13 for k in range(40)]
    for packing in (False, True):
        p0 = plan_epoch(lengths, 4, 32, packing, seed=7, epoch=0)
        assert p0 == plan_epoch(lengths, 4, 32, packing, seed=7, epoch=0)
        assert p0 != plan_epoch(lengths, 4, 32, packing, seed=7, epoch=1)
        assert p0 != plan_epoch(lengths, 4, 32, packing, seed=8, epoch=0)
        # Same number of micro-batches every epoch.
        assert len({len(plan_epoch(lengths, 4, 32, packing, 7, e)) for e in range(5)}) == 1


def test_too_long_example_is_refused():
    with pytest.raises(ValueError, match="longer than max_seq_length=4"):
        make_batches([Example([1] * 5, [1] * 5)], 1, 4, PAD, packing=True, seed=0, epoch=0)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_batch_stream_resumes_exactly_and_rolls_over_epochs():
    rows = random_examples(23, 20)
    stream = BatchStream(rows, batch_size=2, max_seq_length=48, pad_id=PAD, packing=True, seed=3)
    n = len(stream)
    assert n == len(make_batches(rows, 2, 48, PAD, True, 3, 0))
    first_epoch = [next(stream) for _ in range(n)]
    assert stream.state_dict() == {"epoch": 1, "index": 0}
    for got, want in zip(first_epoch, make_batches(rows, 2, 48, PAD, True, 3, 0)):
        assert _same(got, want)
    next(stream)
    state = stream.state_dict()
    assert state == {"epoch": 1, "index": 1}
    expected = [next(stream) for _ in range(n + 2)]  # runs into epoch 2
    resumed = BatchStream(rows, batch_size=2, max_seq_length=48, pad_id=PAD, packing=True, seed=3)
    resumed.load_state_dict(state)
    assert all(_same(next(resumed), want) for want in expected)
    with pytest.raises(ValueError, match="outside an epoch"):
        resumed.load_state_dict({"epoch": 0, "index": n})


def test_batch_stream_shards_across_ranks():
    """World 4 x batch 2 slices the global sequence that world 1 x batch 8 trains on, sequence for sequence;
    the epoch's short last global micro-batch leaves some ranks an empty batch with nothing to train."""
    rows = random_examples(30, 12)
    full = BatchStream(rows, 8, 16, PAD, False, seed=0)
    shards = [BatchStream(rows, 2, 16, PAD, False, seed=0, rank=r, world_size=4) for r in range(4)]
    assert [len(s) for s in shards] == [len(full)] * 4 == [4] * 4  # 30 rows: 8 + 8 + 8 + 6
    for _ in range(2 * len(full)):  # into the second epoch
        want = segments(next(full))
        mine = [next(s) for s in shards]
        got = [seg for b in mine if (b["targets"] != IGN).any() for seg in segments(b)]
        assert got == want
    assert [s.state_dict() for s in shards] == [full.state_dict()] * 4
    last = [BatchStream(rows, 2, 16, PAD, False, seed=0, rank=r, world_size=4) for r in range(4)]
    for s in last:
        s.load_state_dict({"epoch": 0, "index": 3})
    tail = [next(s) for s in last]
    assert [int((b["targets"] != IGN).any()) for b in tail] == [1, 1, 1, 0]
    assert tail[3]["input_ids"].shape == (1, PAD_MULTIPLE)  # filler_batch


# ---- length-grouped batching -----------------------------------------------------------------------


def padding(batches: list[dict[str, torch.Tensor]]) -> int:
    return sum(int((b["attention_mask"] == 0).sum()) for b in batches)


@pytest.mark.parametrize("sampler", ["seeded", "torch"])
def test_group_by_length_keeps_the_rows_and_cuts_the_padding(sampler):
    # uneven rows, as instruction data has them (a few long ones among many short ones)
    rng = random.Random(1)
    lengths = [rng.choice([rng.randint(5, 30), rng.randint(5, 30), rng.randint(60, 150)]) for _ in range(400)]
    rows = [Example(input_ids=[100 + i % 7] * n, labels=[100 + i % 7] * n) for i, n in enumerate(lengths)]
    plain = make_batches(rows, 8, 160, PAD, packing=False, seed=3, epoch=1, sampler=sampler)
    grouped = make_batches(rows, 8, 160, PAD, packing=False, seed=3, epoch=1, group_by_length=True,
                           sampler=sampler)
    assert sorted(s for b in grouped for s in segments(b)) == sorted(s for b in plain for s in segments(b))
    assert len(grouped) == len(plain)
    assert padding(grouped) < 0.5 * padding(plain)
    # deterministic per (seed, epoch), different between epochs
    plan = plan_epoch(lengths, 8, 160, False, seed=3, epoch=1, group_by_length=True, sampler=sampler)
    assert plan == plan_epoch(lengths, 8, 160, False, seed=3, epoch=1, group_by_length=True, sampler=sampler)
    assert plan != plan_epoch(lengths, 8, 160, False, seed=3, epoch=2, group_by_length=True, sampler=sampler)
    # the longest row comes first, as transformers' group_by_length puts it
    assert max(lengths[i] for i in plan[0][0]) == max(lengths)


def test_group_by_length_gives_the_same_loss_totals_per_epoch():
    from fasttune.models.llama import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    rows = random_examples(60, 90, seed=4)
    totals = []
    for grouped in (False, True):
        loss, tokens = 0.0, 0
        with torch.no_grad():
            for b in make_batches(rows, 4, 96, PAD, packing=False, seed=2, epoch=0, group_by_length=grouped):
                out = model(b["input_ids"], position_ids=b["position_ids"], targets=b["targets"],
                            attention_mask=b["attention_mask"])
                loss, tokens = loss + float(out.loss_sum), tokens + int(out.n_tokens)
        totals.append((loss, tokens))
    assert totals[0][1] == totals[1][1]
    assert totals[0][0] == pytest.approx(totals[1][0], rel=1e-5)


def test_stream_resumes_inside_a_grouped_epoch():
    rows = random_examples(30, 40, seed=6)
    stream = BatchStream(rows, 2, 48, PAD, packing=False, seed=1, group_by_length=True, sampler="torch")
    for _ in range(20):
        next(stream)
    resumed = BatchStream(rows, 2, 48, PAD, packing=False, seed=1, group_by_length=True, sampler="torch")
    resumed.load_state_dict(stream.state_dict())
    for _ in range(12):
        a, b = next(stream), next(resumed)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_sequential_sampler_keeps_dataset_order():
    """Evaluation order (transformers' SequentialSampler): rows, or packed sequences built in dataset order,
    batched as they come, whatever the seed and epoch; the 'torch' sampler permutes the same sequences."""
    lengths = [5, 9, 3, 7, 2, 8, 4]
    for seed, epoch in ((0, 0), (5, 3)):
        assert plan_epoch(lengths, 3, 16, False, seed=seed, epoch=epoch, sampler="sequential") == [
            [[0], [1], [2]], [[3], [4], [5]], [[6]]]
    packed = plan_epoch(lengths, 2, 16, True, seed=1, epoch=0, sampler="sequential")
    shuffled = plan_epoch(lengths, 2, 16, True, seed=1, epoch=0, sampler="torch")
    rows = [i for batch in packed for seq in batch for i in seq]
    assert sorted(rows) == list(range(7)) and rows != [i for b in shuffled for s in b for i in s]
    assert sorted(seq for b in packed for seq in b) == sorted(seq for b in shuffled for seq in b)


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="sampler 'hf'"):
        plan_epoch([3, 4], 1, 8, False, seed=0, epoch=0, sampler="hf")


def test_epochs_end_on_whole_windows_with_fillers_that_train_nothing():
    rows = random_examples(13, 30, seed=8)  # 7 micro-batches of 2 an epoch
    plain = BatchStream(rows, 2, 32, PAD, packing=False, seed=4, sampler="torch")
    aligned = BatchStream(rows, 2, 32, PAD, packing=False, seed=4, sampler="torch", epoch_multiple=4)
    assert (len(plain), len(aligned)) == (7, 8)
    for epoch in range(2):
        for i in range(8):
            batch = next(aligned)
            if i < 7:
                want = next(plain)
                assert all(torch.equal(batch[k], want[k]) for k in want), (epoch, i)
            else:  # the filler: one attended pad token, no target
                assert (batch["targets"] == IGN).all() and int(batch["attention_mask"].sum()) == 1
    resumed = BatchStream(rows, 2, 32, PAD, packing=False, seed=4, sampler="torch", epoch_multiple=4)
    resumed.load_state_dict({"epoch": 1, "index": 7})
    assert (next(resumed)["targets"] == IGN).all() and resumed.state_dict() == {"epoch": 2, "index": 0}
