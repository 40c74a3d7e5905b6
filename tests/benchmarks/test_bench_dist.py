"""bench_dist's pieces that run without GPUs: what each suite measures, its random batches and its table."""

from types import SimpleNamespace

import torch


def test_suites_measure_what_the_issue_asks():
    from bench_dist import suite

    args = SimpleNamespace(suite="scaling", modes=["bf16", "qlora"], worlds=[1, 2, 4])
    assert suite(args) == [(w, "ddp", "llama-3.1-8b", m, False) for m in ("bf16", "qlora") for w in (1, 2, 4)]
    args.suite = "overhead"
    assert [(w, m) for w, _, _, m, _ in suite(args)] == [(None, "bf16"), (1, "bf16"), (None, "qlora"),
                                                           (1, "qlora")]
    args.suite = "70b"
    assert suite(args) == [(2, "fsdp", "llama-3.1-70b", "qlora", True)]


def test_random_stream_keeps_the_batch_contract():
    from bench_dist import RandomStream

    a, b = RandomStream(2, 16, 1000, rank=0), RandomStream(2, 16, 1000, rank=1)
    x = next(a)
    assert x["input_ids"].shape == (2, 16) and (x["input_ids"] < 1000).all()
    assert torch.equal(x["targets"][:, :-1], x["input_ids"][:, 1:]) and (x["targets"][:, -1] == -100).all()
    assert not torch.equal(x["input_ids"], next(b)["input_ids"])  # each rank its own rows
    state = a.state_dict()
    want = next(a)
    a.load_state_dict(state)
    assert torch.equal(next(a)["input_ids"], want["input_ids"])


def test_table_gives_the_speed_up_over_one_gpu(capsys):
    from bench_dist import print_table

    row = dict(shape="llama-3.1-8b", mode="bf16", peak_gib_per_gpu=20.0)
    rows = [dict(row, launch="plain", world_size=1, tokens_per_s=1000.0, tokens_per_s_per_gpu=1000.0),
            dict(row, launch="torchrun-ddp", world_size=1, tokens_per_s=990.0, tokens_per_s_per_gpu=990.0),
            dict(row, launch="torchrun-ddp", world_size=2, tokens_per_s=1930.5, tokens_per_s_per_gpu=965.25),
            dict(row, launch="torchrun-ddp", world_size=4, error="OOM")]
    print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert "1.95" in next(line for line in lines if " 2 " in line and "torchrun" in line)
    assert "ERROR OOM" in lines[-1]
