"""The longest sequence that trains one step at batch 1, per stack, within the card's memory and a budget.

    python benchmarks/bench_maxlen.py --stacks fasttune unsloth --mode qlora --shape llama-2-7b \
        --model-dir /tmp/bench-model-l2 --start 262144 --known-fit 131072 --max-seconds 500

Each attempt is one `bench_train.py` worker process (an OOM leaves the allocator fragmented, so a failed
length must not share a process with the next): model load, one step (forward + backward + optimiser,
no warm-up, so the first step's compile and autotuning are inside it), peak = max_memory_allocated.
The search doubles from `--start` until a length fails, then bisects between the longest length that
fitted and the shortest that ran out of memory, down to `--resolution` tokens. `--known-fit` is a length
measured earlier to fit (the bisection's floor; it is not re-run).

A step's cost grows with the square of the length (attention), minutes past 131,072 tokens, so
the budget decides how far the search gets: before each attempt its cost is predicted from the last
success (load time + step time x (length ratio)^2) and the search stops, saying so, when that exceeds
what is left of `--max-seconds` (split evenly between the stacks). A timed-out or crashed attempt also
stops it: neither says whether the length fits. One JSON row per stack (`kind: maxlen`) is printed and
appended to `--out`, with every attempt in it.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import bench_train


@dataclass
class Attempt:
    seq: int
    outcome: str  # "fit" | "oom" | "timeout" | "error"
    wall_s: float = 0.0  # the whole process: load + step
    step_s: float | None = None
    peak_gib: float | None = None
    detail: str = ""


def predict_wall(last_fit: Attempt | None, seq: int) -> float:
    """Seconds an attempt at `seq` should take, from the longest success so far (0 when there is none)."""
    if last_fit is None or last_fit.step_s is None:
        return 0.0
    load = max(last_fit.wall_s - last_fit.step_s, 0.0)
    return load + last_fit.step_s * max(seq / last_fit.seq, 1.0) ** 2


def search(
    try_len: Callable[[int, float], Attempt],
    start: int,
    resolution: int,
    limit: int,
    max_seconds: float,
    known_fit: int = 0,
    clock: Callable[[], float] = time.monotonic,
) -> dict:
    """Doubling from `start` (capped at `limit`), then bisection to `resolution`; `try_len(seq, timeout)`.

    Returns max_fit (0: nothing fitted), first_fail (None: nothing ran out of memory), resolved (the two
    are within `resolution`), stopped (why the search ended early, or None) and the attempts.
    Example, fits up to 300,000, start 131,072, resolution 4,096: 131,072 fit, 262,144 fit, 524,288 oom,
    393,216 oom, 327,680 oom, 294,912 fit, 311,296 oom, 303,104 oom, 299,008 fit -> max_fit 299,008.
    """
    deadline = clock() + max_seconds
    lo, hi, attempts, stopped = known_fit, None, [], None
    last_fit: Attempt | None = None

    def attempt(seq: int) -> Attempt | None:
        nonlocal stopped
        left = deadline - clock()
        need = predict_wall(last_fit, seq)
        if left < 1 or need > left:
            stopped = f"budget: {seq} predicted {need:.0f} s, {max(left, 0):.0f} s left"
            return None
        a = try_len(seq, left)
        attempts.append(a)
        if a.outcome in ("timeout", "error"):
            stopped = f"{a.outcome} at {seq}: {a.detail}"[:200]
            return None
        return a

    seq = max(start, known_fit + resolution) if known_fit else start
    while hi is None and seq <= limit:  # doubling
        a = attempt(seq)
        if a is None:
            break
        if a.outcome == "fit":
            lo, last_fit, seq = seq, a, seq * 2
        else:
            hi = seq
    while stopped is None and hi is not None and hi - lo > resolution:  # bisection
        mid = lo + max(resolution, (hi - lo) // 2 // resolution * resolution)
        if mid >= hi:
            break
        a = attempt(mid)
        if a is None:
            break
        if a.outcome == "fit":
            lo, last_fit = mid, a
        else:
            hi = mid
    if stopped is None and hi is None and seq > limit:
        stopped = f"limit: every length up to {lo} fitted (--limit {limit})"
    return {"max_fit": lo, "first_fail": hi, "resolved": hi is not None and hi - lo <= resolution,
            "stopped": stopped, "peak_gib_at_fit": last_fit.peak_gib if last_fit else None,
            "attempts": [a.__dict__ for a in attempts]}


def worker_attempt(stack: str, args) -> Callable[[int, float], Attempt]:
    """`try_len` that runs one bench_train worker: batch 1, no warm-up, one step."""

    def try_len(seq: int, left: float) -> Attempt:
        run = argparse.Namespace(shape=args.shape, model_dir=args.model_dir, steps=1, warmup=0,
                                 variants=[args.variant], profile=None, log_dir=args.log_dir,
                                 timeout=int(min(args.attempt_timeout, left)))
        t0 = time.monotonic()
        row = bench_train.run_one(stack, args.mode, 1, seq, run)[0]
        wall = time.monotonic() - t0
        err = row.get("error")
        if err is None:
            a = Attempt(seq, "fit", wall, row["step_s"], row["peak_gib"])
        else:
            outcome = "oom" if err.startswith("OOM") else "timeout" if err.startswith("TIMEOUT") else "error"
            a = Attempt(seq, outcome, wall, detail=err[:200])
        print(f"  {stack} {seq}: {a.outcome} in {wall:.0f} s"
              + (f" (step {a.step_s:.1f} s, peak {a.peak_gib:.2f} GiB)" if a.outcome == "fit" else ""),
              flush=True)
        return a

    return try_len


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stacks", nargs="+", default=["fasttune", "unsloth"])
    p.add_argument("--mode", default="qlora", choices=["bf16", "qlora"])
    p.add_argument("--shape", default="llama-2-7b", choices=sorted(bench_train.SHAPES))
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model-l2"))
    p.add_argument("--tokenizer", type=Path, default=Path(".bench_assets/tokenizer"))
    p.add_argument("--variant", default="offload", help="fasttune's checkpointing variant (bench_train)")
    p.add_argument("--start", type=int, default=131072)
    p.add_argument("--known-fit", type=int, default=0, help="a length measured earlier to fit; not re-run")
    p.add_argument("--resolution", type=int, default=4096)
    p.add_argument("--limit", type=int, default=1 << 20)
    p.add_argument("--attempt-timeout", type=float, default=420)
    p.add_argument("--max-seconds", type=float, default=540, help="for all stacks together")
    p.add_argument("--out", type=Path, default=Path("bench_results.jsonl"))
    p.add_argument("--log-dir", default="bench_logs")
    args = p.parse_args()
    t0 = time.monotonic()
    bench_train.write_model_dir(args.shape, args.model_dir, args.tokenizer)
    rows = []
    for n, stack in enumerate(args.stacks):
        # an even share of what is left, so the first stack cannot spend the second one's time
        share = (args.max_seconds - (time.monotonic() - t0)) / (len(args.stacks) - n)
        print(f"{stack}: searching from {args.start} for up to {share:.0f} s", flush=True)
        res = search(worker_attempt(stack, args), args.start, args.resolution, args.limit, share,
                     args.known_fit)
        row = {"kind": "maxlen", "stack": stack, "shape": args.shape, "mode": args.mode, "batch": 1,
               "variant": args.variant if stack == "fasttune" else "peer", "start": args.start,
               "known_fit": args.known_fit, "resolution": args.resolution, **res}
        print(json.dumps(row), flush=True)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    bench_train.print_table(rows)


if __name__ == "__main__":
    main()
