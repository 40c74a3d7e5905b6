"""DPO after SFT on the CPU with the embedded model: does preference tuning raise the held-out preference
accuracy and margin?

1. SFT on builtin:lumen (the manual's questions and answers).
2. DPO from that adapter (`init_from`; the reference is the SFT adapter) on builtin:lumen_pref, evaluated on
   its 30 held-out pairs every `--eval_steps`.
Prints one table row per eval (the DPO reward accuracy and margin against the SFT reference, and the
policy's own preference: the share of pairs whose chosen answer is the more likely one, and the mean
log-probability margin), and writes the curves to `--plot`.

    python benchmarks/dpo_cpu.py --out runs/dpo_cpu --plot benchmarks/dpo_cpu.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fasttune import api
from fasttune.config import RunConfig, apply_overrides


def run(values: dict) -> Path:
    values = {"show_samples": 0, "eval_answers": 0, "report": False, **values}
    cfg = apply_overrides(RunConfig(), values, "dpo_cpu")
    return api.train(cfg).run_dir


def evals(run_dir: Path) -> list[dict]:
    records = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in records if r["kind"] == "eval"]


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    a.plot(steps, [r["eval_logps/accuracies"] for r in rows], "o-", label="log p(chosen) > log p(rejected)")
    a.plot(steps, [r["eval_rewards/accuracies"] for r in rows], "s--", label="DPO reward accuracy")
    a.set_xlabel("DPO step"), a.set_ylabel("share of held-out pairs"), a.set_ylim(-0.02, 1.02), a.legend()
    b.plot(steps, [r["eval_logps/chosen"] - r["eval_logps/rejected"] for r in rows], "o-",
           label="mean log p(chosen) - log p(rejected)")
    b.plot(steps, [r["eval_rewards/margins"] for r in rows], "s--", label="DPO reward margin")
    b.set_xlabel("DPO step"), b.set_ylabel("nats"), b.legend()
    fig.suptitle("DPO after SFT, SmolLM2-135M on the CPU, 30 held-out Lumen pairs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/dpo_cpu")
    p.add_argument("--sft_steps", type=int, default=80)
    p.add_argument("--dpo_steps", type=int, default=40)
    p.add_argument("--eval_steps", type=int, default=5)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dpo_lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    out = Path(args.out)
    sft = run({"dataset": "builtin:lumen", "eval_dataset": "none", "max_steps": args.sft_steps,
               "per_device_train_batch_size": args.batch, "max_seq_length": 128,
               "output_dir": str(out / "sft")})
    dpo = run({"method": "dpo", "init_from": str(sft), "dataset": "builtin:lumen_pref", "beta": args.beta,
               "max_steps": args.dpo_steps, "per_device_train_batch_size": args.batch, "max_seq_length": 128,
               "learning_rate": args.dpo_lr, "warmup_steps": 0, "eval_steps": args.eval_steps,
               "logging_steps": args.eval_steps, "output_dir": str(out / "dpo")})
    rows = evals(dpo)
    print("| DPO step | held-out: chosen more likely | mean log-prob margin | DPO reward accuracy | "
          "DPO reward margin | DPO eval loss |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['step']} | {r['eval_logps/accuracies']:.3f} | "
              f"{r['eval_logps/chosen'] - r['eval_logps/rejected']:.2f} | "
              f"{r['eval_rewards/accuracies']:.3f} | {r['eval_rewards/margins']:.3f} | "
              f"{r['eval_loss']:.4f} |")
    if args.plot:
        plot(rows, args.plot)


if __name__ == "__main__":
    main()
