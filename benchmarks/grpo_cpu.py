"""GRPO on the CPU with the embedded model and an exact-answer reward: does the mean reward rise?

The prompts ask for the sum of two digits "with the number only". The reward, `states_answer`, is 1.0 where
a number in the completion is exactly the answer column (the sum) and 0.0 otherwise; the built-in
`exact_match` (the whole completion is the answer, nothing else) is logged beside it with weight 0, to show
whether the bare format is learnt too. Prints the mean rewards per step and writes the curve to `--plot`.

The training reward of a step is measured on that step's few prompts, some easier than others; so the
policy is also scored before and after training on held-out questions (sums the training prompts do not
ask), `--eval_samples` completions each, sampled with the same seed both times (before: the adapter off).

    python benchmarks/grpo_cpu.py --out runs/grpo_cpu --plot benchmarks/grpo_cpu.png
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from fasttune import api
from fasttune.config import DataConfig, RunConfig, apply_overrides


def states_answer(completions, answer, **_):
    """1.0 where one of the completion's numbers is exactly the answer."""
    found = [re.findall(r"-?\d+", c[-1]["content"]) for c in completions]
    return [float(str(a) in numbers) for numbers, a in zip(found, answer)]


def questions(n_train: int, n_eval: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Distinct sums a + b (a in 1..9, b in 0..9) in a seeded order: the training ones, then held-out ones."""
    pairs = [(a, b) for a in range(1, 10) for b in range(10)]
    random.Random(0).shuffle(pairs)
    return pairs[:n_train], pairs[n_train:n_train + n_eval]


def prompts(path: Path, sums: list[tuple[int, int]]) -> str:
    rows = [{"prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with the number only."}],
             "answer": str(a + b)} for a, b in sums]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def held_out_rewards(result, path: str, funcs: list, samples: int, max_new: int, temperature: float) -> dict:
    """Mean reward per function of `samples` sampled completions per held-out question, before (the
    adapter off) and after training, with the same sampling seed."""
    from fasttune.data.pairs import build_method_data
    from fasttune.infer.load import stop_ids
    from fasttune.lora.reference import adapters_off
    from fasttune.train.rewards import resolve_reward
    from fasttune.train.rollout import RolloutStream

    model, tok, contract = result.model, result.tokenizer, result.contract
    data = build_method_data(DataConfig(dataset=path), "grpo", tok, 128, "eval", contract)
    funcs = [resolve_reward(f) for f in funcs]
    stream = RolloutStream(model, tok, data.examples, funcs, reward_weights=None,
                           batch_size=samples * len(data.examples), num_generations=samples,
                           max_completion_length=max_new, temperature=temperature, top_p=1.0,
                           pad_id=contract.pad_id, eos_ids=stop_ids(contract, tok), max_seq_length=128,
                           seed=0)
    out = {}
    with adapters_off(model):
        out["before"] = stream.sample(data.examples, seed=1).get("rewards").mean(dim=0).tolist()
    out["after"] = stream.sample(data.examples, seed=1).get("rewards").mean(dim=0).tolist()
    out["questions"], out["samples"] = len(data.examples), samples
    return out


def plot(rows: list[dict], held: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["rewards/states_answer/mean"] for r in rows], "o-", label="a number in it is the sum")
    ax.plot(steps, [r["rewards/exact_match/mean"] for r in rows], "s--", label="completion is the sum alone")
    last = steps[-1] if steps else 1
    for k, (name, marker) in enumerate((("a number in it is the sum", "o"), ("the sum alone", "s"))):
        ax.plot([0, last], [held["before"][k], held["after"][k]], marker, ls=":", color="grey",
                label=f"held-out, before / after ({name})" if k == 0 else "held-out, the sum alone")
    ax.set_xlabel("GRPO step"), ax.set_ylabel("mean reward"), ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7)
    ax.set_title("GRPO, SmolLM2-135M-Instruct on the CPU")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/grpo_cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--prompts", type=int, default=40, help="training questions")
    p.add_argument("--eval_prompts", type=int, default=16, help="held-out questions")
    p.add_argument("--eval_samples", type=int, default=8, help="completions per held-out question")
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--batch", type=int, default=16, help="completions per step (prompts x num_generations)")
    p.add_argument("--max_completion_length", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train_sums, eval_sums = questions(args.prompts, args.eval_prompts)
    values = {"method": "grpo", "dataset": prompts(out / "sums.jsonl", train_sums), "eval_dataset": "none",
              "reward_weights": [1.0, 0.0], "num_generations": args.num_generations,
              "per_device_train_batch_size": args.batch, "max_completion_length": args.max_completion_length,
              "temperature": args.temperature, "max_steps": args.steps, "learning_rate": args.lr,
              "warmup_steps": 0, "logging_steps": 1, "max_seq_length": 128, "show_samples": 0,
              "report": False, "output_dir": str(out / "grpo")}
    cfg = apply_overrides(RunConfig(), values, "grpo_cpu")
    funcs = [states_answer, "exact_match"]
    result = api.train(cfg, reward_funcs=funcs)
    rows = [r for r in map(json.loads, (result.run_dir / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == "train"]
    print("| GRPO step | a number in it is the sum | completion is the sum alone | mean completion length | "
          "truncated share |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['rewards/states_answer/mean']:.3f} | "
              f"{r['rewards/exact_match/mean']:.3f} | "
              f"{r['completions/mean_length']:.2f} | {r['completions/clipped_ratio']:.2f} |")
    held = held_out_rewards(result, prompts(out / "held_out.jsonl", eval_sums), funcs, args.eval_samples,
                            args.max_completion_length, args.temperature)
    print(f"held-out: {held['questions']} questions x {held['samples']} samples")
    print("| held-out | a number in it is the sum | completion is the sum alone |")
    print("|---|---:|---:|")
    for when in ("before", "after"):
        print(f"| {when} training | {held[when][0]:.3f} | {held[when][1]:.3f} |")
    (out / "held_out.json").write_text(json.dumps(held))
    if args.plot:
        plot(rows, held, args.plot)


if __name__ == "__main__":
    main()
