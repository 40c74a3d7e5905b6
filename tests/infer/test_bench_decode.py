"""The decoding benchmark's harness runs (tiny shape, CPU) and both stacks decode the same shared weights."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_decode.py"


def test_tiny_shape_smoke_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("bench_decode", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "rows.jsonl"
    rc = bench.main(["--shape", "tiny", "--new-tokens", "6", "--prompt", "5", "--repeats", "1",
                     "--stacks", "hf", "fasttune-eager", "--dtype", "fp32", "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["stack"] for r in rows] == ["hf", "fasttune-eager"]
    assert all(r["tokens_per_s"] > 0 and r["new_tokens"] == 6 for r in rows)
    table = capsys.readouterr().out.splitlines()
    assert table[-1].split()[0] == "fasttune-eager" and table[-1].split()[-1] == "6/6"  # same greedy tokens
