"""The decoding benchmark's harness runs (tiny shape, CPU): the stacks decode the same shared (packed)
weights, and its one-step check finds the fused step's logits equal to the model's step."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_decode.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_tiny_shape_smoke_run(tmp_path, capsys):
    bench = load_bench()
    out = tmp_path / "rows.jsonl"
    rc = bench.main(["--shape", "tiny", "--new-tokens", "6", "--prompt", "5", "--repeats", "1",
                     "--stacks", "hf", "fasttune-eager", "--dtype", "fp32", "--out", str(out)])
    assert rc == 0
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    check, rows = lines[0], lines[1:]
    assert check["check"] == "fused_vs_unfused_step_logits" and check["same_argmax"]
    assert 0 < check["max_abs_logit"] and check["max_abs_diff"] < 1e-4 * check["max_abs_logit"]
    assert [r["stack"] for r in rows] == ["hf", "fasttune-eager"]
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 6 for r in rows)
    table = capsys.readouterr().out.splitlines()
    header, last = table[-4].split(), table[-2].split()
    assert header[-1] == "twin" and last[0] == "fasttune-eager"
    assert last[-2] == "6/6"  # the same greedy tokens as transformers on the same weights
    assert rows[1]["pipelined"] is False  # on the CPU the loop never overlaps


def test_every_fasttune_stack_names_a_decode_mode():
    from fasttune.infer.static_decode import decode_variant

    bench = load_bench()
    ours = [s for s in bench.STACKS if s != "hf"]
    assert set(ours) == set(bench.MODES) and set(bench.CUDA_DEFAULT) <= set(bench.STACKS)
    variants = {s: decode_variant(bench.MODES[s]) for s in ours}
    assert variants["fasttune-cuda_graph"] == ("cuda_graph", True)
    assert variants["fasttune-cuda_graph-unfused"] == ("cuda_graph", False)
    assert variants["fasttune-compile"] == ("compile", True)
    assert variants["fasttune-compile-unfused"] == ("compile", False)
    assert variants["fasttune-cuda_graph-sync"] == ("cuda_graph", True) and bench.SYNC_LOOP <= set(ours)
    assert bench.twin("fasttune-cuda_graph-sync") == "fasttune-cuda_graph"
    assert bench.twin("fasttune-cuda_graph") == "fasttune-cuda_graph-unfused"


def test_sync_stack_runs_the_loop_without_overlap(monkeypatch):
    """'-sync' passes pipeline=False to generate (the CPU never overlaps: this tests the wiring)."""
    import fasttune.infer.generate as gen

    bench = load_bench()
    seen = []
    monkeypatch.setattr(gen, "generate", lambda *a, **kw: seen.append(kw["pipeline"]) or a[1])
    for stack in ("fasttune-cuda_graph-sync", "fasttune-cuda_graph"):
        bench.decode_once(stack, None, None, "prompt", 3)
    assert seen == [False, None]
