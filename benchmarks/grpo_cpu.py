"""GRPO on the CPU with the embedded model and an exact-answer reward: does the mean reward rise?

The prompts ask for the sum of two digits "with the number only"; the built-in `exact_match` reward is 1.0
where the completion is exactly the answer column (the sum) and 0.0 otherwise, so the model must learn both
the arithmetic and the bare format. Prints the mean reward per logged step and writes the curve to `--plot`.

    python benchmarks/grpo_cpu.py --out runs/grpo_cpu --plot benchmarks/grpo_cpu.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fasttune import api
from fasttune.config import RunConfig, apply_overrides


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
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], "o-", label="mean exact_match reward")
    ax.set_xlabel("GRPO step"), ax.set_ylabel("reward (share of exact answers)"), ax.set_ylim(-0.02, 1.02)
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
    p.add_argument("--max_completion_length", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    values = {"method": "grpo", "dataset": prompts(out / "sums.jsonl", args.prompts), "eval_dataset": "none",
              "reward": ["exact_match"], "num_generations": args.num_generations,
              "per_device_train_batch_size": args.batch, "max_completion_length": args.max_completion_length,
              "max_steps": args.steps, "learning_rate": args.lr, "warmup_steps": 0, "logging_steps": 1,
              "max_seq_length": 128, "show_samples": 0, "report": False, "output_dir": str(out / "grpo")}
    result = api.train(apply_overrides(RunConfig(), values, "grpo_cpu"))
    rows = [r for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]
    print("| GRPO step | mean reward | reward std | mean completion length | truncated share |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['reward']:.3f} | {r['reward_std']:.3f} | "
              f"{r['completions/mean_length']:.2f} | {r['completions/clipped_ratio']:.2f} |")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
