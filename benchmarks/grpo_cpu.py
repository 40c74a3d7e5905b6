"""GRPO on the CPU with the embedded model and an exact-answer reward: does the mean reward rise?

The prompts ask for the sum of two digits "with the number only". The reward, `states_answer`, is 1.0 where
a number in the completion is exactly the answer column (the sum) and 0.0 otherwise; the built-in
`exact_match` (the whole completion is the answer, nothing else) is logged beside it with weight 0, to show
whether the bare format is learnt too. Prints the mean rewards per step and writes the curve to `--plot`.

    python benchmarks/grpo_cpu.py --out runs/grpo_cpu --plot benchmarks/grpo_cpu.png
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from fasttune import api
from fasttune.config import RunConfig, apply_overrides


def states_answer(completions, answer, **_):
    """1.0 where one of the completion's numbers is exactly the answer."""
    found = [re.findall(r"-?\d+", c[-1]["content"]) for c in completions]
    return [float(str(a) in numbers) for numbers, a in zip(found, answer)]


def prompts(path: Path, n: int) -> str:
    rows = []
    for k in range(n):
        a, b = (3 * k + 1) % 9 + 1, (5 * k + 2) % 9
        question = f"What is {a} + {b}? Reply with the number only."
        rows.append({"prompt": [{"role": "user", "content": question}], "answer": str(a + b)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["rewards/states_answer/mean"] for r in rows], "o-", label="a number in it is the sum")
    ax.plot(steps, [r["rewards/exact_match/mean"] for r in rows], "s--", label="completion is the sum alone")
    ax.set_xlabel("GRPO step"), ax.set_ylabel("mean reward"), ax.set_ylim(-0.02, 1.02)
    ax.legend()
    ax.set_title("GRPO, SmolLM2-135M-Instruct on the CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/grpo_cpu")
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--num_generations", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="completions per step (prompts x num_generations)")
    p.add_argument("--max_completion_length", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    values = {"method": "grpo", "dataset": prompts(out / "sums.jsonl", args.prompts), "eval_dataset": "none",
              "reward_weights": [1.0, 0.0], "num_generations": args.num_generations,
              "per_device_train_batch_size": args.batch, "max_completion_length": args.max_completion_length,
              "max_steps": args.steps, "learning_rate": args.lr, "warmup_steps": 0, "logging_steps": 1,
              "max_seq_length": 128, "show_samples": 0, "report": False, "output_dir": str(out / "grpo")}
    cfg = apply_overrides(RunConfig(), values, "grpo_cpu")
    result = api.train(cfg, reward_funcs=[states_answer, "exact_match"])
    rows = [r for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]
    print("| GRPO step | a number in it is the sum | completion is the sum alone | mean completion length | "
          "truncated share |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['rewards/states_answer/mean']:.3f} | "
              f"{r['rewards/exact_match/mean']:.3f} | "
              f"{r['completions/mean_length']:.2f} | {r['completions/clipped_ratio']:.2f} |")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
