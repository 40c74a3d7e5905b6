"""bench_uneven on the CPU: every stack trains on the same micro-batches of uneven rows, counts only real
tokens, and (unpacked, before any update) fasttune and transformers + PEFT give the same first loss."""

import argparse
import json

import bench_train as bt
import bench_uneven as bu
import instruction_data
import pytest


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tokenizer_dir):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("uneven")
    bt.write_model_dir("tiny", root / "model", tokenizer_dir)
    # short rows keep the CPU steps small; the benchmark's own rows run to 1,500 tokens
    rows = instruction_data.make_rows(120, seed=2, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
                                      lo=45, hi=250, median=80)
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def args_for(root, stack, packing, grouping="off", batch=2, cuda_graph=True):
    return argparse.Namespace(stack=stack, shape="tiny", mode="bf16", batch=batch, packing=packing,
                              grouping=grouping, model_dir=root / "model", data=root / "data.jsonl",
                              max_len=256, seq=256, steps=1, warmup=1, seed=0, device="cpu", kernels=False,
                              keep_narrow=True, cuda_graph=cuda_graph, rows_timed=0)


@pytest.mark.slow
@pytest.mark.parametrize("packing", ["off", "on"])
@pytest.mark.parametrize("cuda_graph", [True, False])
def test_stacks_train_the_same_real_tokens(setup, packing, cuda_graph):
    """fasttune's step as `fasttune train` runs it (`graph_rows`' batch through `MicroStepGraph`, eager on the
    CPU) and plain, against transformers + PEFT."""
    ours = bu.worker(args_for(setup, "fasttune", packing, cuda_graph=cuda_graph))
    peer = bu.worker(args_for(setup, "hf", packing))
    assert "error" not in ours and "error" not in peer, (ours, peer)
    assert ours["cuda_graph"] is cuda_graph and ("graph_replays" in ours) is cuda_graph
    assert ours["real_tokens"] == peer["real_tokens"] > 0 and ours["batch_tokens"] == peer["batch_tokens"]
    assert ours["tokens_per_s"] == pytest.approx(ours["real_tokens"] / ours["seconds"])
    # each step's time and padded width, the timed ones summing to the reported seconds
    assert len(ours["steps"]) == 2 and ours["steps"][1][1] * 2 == ours["batch_tokens"]
    assert ours["steps"][1][0] == pytest.approx(ours["seconds"], abs=1e-4)
    assert ours["rows"] == peer["rows"] == (2 if packing == "off" else bu.rows_in(bu.micro_batches(
        args_for(setup, "fasttune", packing))[1]))
    if packing == "off":  # same weights, same tokens, LoRA B = 0: the base model's loss in both
        assert ours["loss0"] == pytest.approx(peer["loss0"], rel=1e-4)
        assert 0 < ours["pad_share"] < 1
    else:
        assert peer["attention"].endswith("position_ids only")


def test_grouped_batches_carry_less_padding(setup):
    plain = bu.epoch_batches(args_for(setup, "fasttune", "off", batch=4))
    grouped = bu.epoch_batches(args_for(setup, "fasttune", "off", "on", batch=4))
    pads = [sum(int((b["attention_mask"] == 0).sum()) for b in bs) for bs in (plain, grouped)]
    assert pads[1] < pads[0]


@pytest.mark.parametrize("packing", ["off", "on"])
def test_rows_timed_picks_the_micro_batches_that_hold_those_rows(setup, packing):
    """--rows-timed N: after the warm-up, the fewest micro-batches holding at least N rows, whatever the
    batch size or packing; more rows than the epoch holds is an error that says so."""
    for batch in (2, 4):
        args = args_for(setup, "fasttune", packing, batch=batch)
        args.rows_timed = 30
        batches = bu.micro_batches(args)
        held = [bu.rows_in(b) for b in batches[args.warmup:]]
        assert sum(held) >= 30 and sum(held[:-1]) < 30
        if packing == "off":
            assert held == [batch] * len(held)
        else:  # packed sequences hold several rows each
            assert max(held) > batch
        # the rows counted are the row starts: every one of the epoch's rows once
        assert sum(bu.rows_in(b) for b in bu.epoch_batches(args)) == 120
    args.rows_timed = 10_000
    with pytest.raises(SystemExit, match="holds 1[0-9]+ rows, --rows-timed 10000 asked"):
        bu.micro_batches(args)
