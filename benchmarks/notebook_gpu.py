"""The Unsloth Alpaca notebook (tests/notebooks/unsloth_alpaca.py) at its own settings (max_seq_length 2048,
batch 2 x accumulation 4, 60 steps, 4-bit) on a GPU, once as written (Unsloth, TRL, transformers) and once
with only its import lines changed to fasttune, each in its own process, on the same model directory and
the same uneven instruction rows (`instruction_data.py`, about 50 to 1,500 tokens).

    python3 benchmarks/notebook_gpu.py --shape llama-3.1-8b --model-dir /tmp/bench-model \
        --stacks fasttune unsloth --out notebook_curves.json --plot notebook_curves.png

For each stack it records trainer.train()'s wall time, the loss of every step (logging_steps=1, as the
notebook logs) and, per step, the trained tokens (labels that are not -100, after the shift) and the real
length of each row, read from the micro-batches the trainer draws (transformers' train dataloader; for
fasttune the same batch stream its loop consumes, checked against the trained tokens its loop logged).
It prints the two curves side by side with their differences and whether each step trained the same
tokens; --plot draws both loss curves into one figure. The model directory is written once with
`bench_train.write_model_dir` (random weights, the tokenizer in --tokenizer): the loss starts near
ln(vocabulary) and says nothing about learning, only whether the two stacks train the same thing. fasttune
draws the LoRA A matrices that PEFT draws after Unsloth's get_peft_model seeds the RNG with random_state
(tests/lora/test_peft_format.py), so where Unsloth draws nothing else in between both start from the same
adapters and the curves differ by the kernels' arithmetic; step 1 (B = 0) is the base model's loss in both.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "tests" / "notebooks" / "unsloth_alpaca.py"
IMPORTS = {
    "from unsloth import FastLanguageModel": "from fasttune import FastLanguageModel",
    "from unsloth import is_bfloat16_supported": "from fasttune import is_bfloat16_supported",
    "from trl import SFTTrainer": "from fasttune import SFTTrainer",
    "from transformers import TrainingArguments": "from fasttune import TrainingArguments",
}
# The notebook's own sizes (its cells fix them; the CPU test passes smaller ones).
NOTEBOOK_SIZES = dict(MAX_SEQ_LENGTH=2048, GRADIENT_ACCUMULATION_STEPS=4, WARMUP_STEPS=5, MAX_STEPS=60,
                      MAX_NEW_TOKENS=64)


def ported_notebook() -> str:
    """The notebook's text with the four import lines replaced (each must be present exactly once)."""
    text = NOTEBOOK.read_text()
    for theirs, ours in IMPORTS.items():
        if text.count(theirs) != 1:
            raise SystemExit(f"{NOTEBOOK}: expected the line {theirs!r} once")
        text = text.replace(theirs, ours)
    return text


# ---- what each step trained -----------------------------------------------------------------------

def _windows(loader, accumulation: int, steps: int, per_epoch: bool) -> list[list[dict]]:
    """The micro-batches of each of the first `steps` optimiser steps. per_epoch: `loader` yields one
    epoch per pass (transformers' train dataloader, whose seedable sampler moves to the next epoch after
    each pass) and every epoch ends on its own, possibly shorter, window; else it is one endless stream."""
    out: list[list[dict]] = []
    while len(out) < steps:
        if per_epoch:
            epoch = list(loader)
            out += [epoch[k:k + accumulation] for k in range(0, len(epoch), accumulation)]
        else:
            out.append([next(loader) for _ in range(accumulation)])
    return out[:steps]


def _counts(window: list[dict], fasttune: bool) -> dict[str, Any]:
    """Trained tokens and the real length of each row of one step's micro-batches."""
    trained, lengths = 0, []
    for batch in window:
        if fasttune:  # targets are already shifted; a row with none completes a window (a filler)
            trained += int((batch["targets"] != -100).sum())
            lengths += batch["attention_mask"].sum(1)[(batch["targets"] != -100).any(1)].tolist()
        else:  # transformers' labels: the model shifts them, so position 0 is never a target
            trained += int((batch["labels"][:, 1:] != -100).sum())
            lengths += _document_lengths(batch)
    return {"trained_tokens": trained, "row_lengths": [int(n) for n in lengths]}


def _document_lengths(batch: dict) -> list[int]:
    """The length of each row in a transformers-style micro-batch. A padding-free collator (TRL's
    `padding_free`, which Unsloth turns on by itself) concatenates a micro-batch's rows into one sequence
    whose position_ids restart at 0 where each row begins: those are split back into their rows."""
    mask = batch.get("attention_mask")
    positions = batch.get("position_ids")
    if positions is None or not bool((positions[:, 1:] == 0).any()):
        return (mask if mask is not None else batch["labels"] != -100).sum(1).tolist()
    lengths: list[int] = []
    for r in range(positions.shape[0]):
        row = positions[r] if mask is None else positions[r][mask[r].bool()]
        starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
        lengths += [b - a for a, b in zip(starts, starts[1:])]
    return lengths


def step_records(trainer: Any, fasttune: bool) -> list[dict[str, Any]]:
    """Each logged step's loss with the trained tokens and row lengths of the micro-batches it drew."""
    args = trainer.args
    accumulation = int(args.gradient_accumulation_steps)
    losses = {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}
    steps = max(losses, default=0)
    if fasttune:
        loader = trainer.batch_stream(int(args.per_device_train_batch_size), trainer.packing, accumulation)
    else:
        loader = trainer.get_train_dataloader()  # a fresh sampler: epoch 0's order, as trained
    windows = _windows(loader, accumulation, steps, per_epoch=not fasttune)
    records = [{"step": i + 1, "loss": losses.get(i + 1), **_counts(w, fasttune)}
               for i, w in enumerate(windows)]
    if fasttune:  # the loop's own count of what it trained (cumulative in metrics.jsonl), step by step
        metrics = Path(args.output_dir) / "metrics.jsonl"
        logged = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        total = {m["step"]: m["trained_tokens"] for m in logged if m.get("kind") == "train"}
        for r in records:
            if r["step"] in total and r["step"] - 1 in {0, *total}:
                r["trained_tokens_logged"] = total[r["step"]] - total.get(r["step"] - 1, 0)
    return records


# ---- one stack, one process -----------------------------------------------------------------------

def worker(args) -> dict[str, Any]:
    fasttune = args.stack == "fasttune"
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "notebook.py"
        script.write_text(ported_notebook() if fasttune else NOTEBOOK.read_text())
        t0 = time.perf_counter()
        ns = runpy.run_path(str(script), init_globals=dict(
            MODEL_NAME=str(args.model_dir), DATA_FILE=str(args.data), OUTPUT_DIR=str(Path(tmp) / "out"),
            SAVE_DIR=str(Path(tmp) / "lora_model"), **NOTEBOOK_SIZES))
        wall = time.perf_counter() - t0
        records = step_records(ns["trainer"], fasttune)
    import torch

    stats = ns["trainer_stats"]
    return {"stack": args.stack, "train_runtime": stats.metrics["train_runtime"], "notebook_s": wall,
            "training_loss": stats.training_loss, "steps": records, **NOTEBOOK_SIZES,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None}


# ---- the orchestrator -----------------------------------------------------------------------------

def compare(results: dict[str, dict]) -> None:
    """The two curves side by side: loss, its difference, trained tokens, same rows or not."""
    if {"fasttune", "unsloth"} - set(results):
        return
    ours, theirs = results["fasttune"]["steps"], results["unsloth"]["steps"]
    print(f"\n{'step':>4} {'fasttune loss':>13} {'unsloth loss':>12} {'diff':>8} {'tokens':>13}  rows")
    worst = 0.0
    for a, b in zip(ours, theirs):
        diff = (a["loss"] or float("nan")) - (b["loss"] or float("nan"))
        worst = max(worst, abs(diff))
        same = "same" if sorted(a["row_lengths"]) == sorted(b["row_lengths"]) else "DIFFERENT"
        tokens = f"{a['trained_tokens']}/{b['trained_tokens']}"
        print(f"{a['step']:4d} {a['loss']:13.4f} {b['loss']:12.4f} {diff:8.4f} {tokens:>13}  {same}")
    t_ours, t_theirs = results["fasttune"]["train_runtime"], results["unsloth"]["train_runtime"]
    print(f"\nlargest loss difference {worst:.4f}; trainer.train(): fasttune {t_ours:.1f} s, unsloth "
          f"{t_theirs:.1f} s ({t_theirs / t_ours:.2f}x)")


def plot(results: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for stack, r in results.items():
        ax.plot([s["step"] for s in r["steps"]], [s["loss"] for s in r["steps"]], label=stack,
                marker="." if stack == "fasttune" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("Unsloth Alpaca notebook, its own settings")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stack", default="fasttune", help=argparse.SUPPRESS)
    p.add_argument("--stacks", nargs="+", default=["fasttune", "unsloth"], choices=["fasttune", "unsloth"])
    p.add_argument("--shape", default="llama-3.1-8b")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model"))
    p.add_argument("--tokenizer", type=Path, default=ROOT / ".bench_assets" / "tokenizer")
    p.add_argument("--data", type=Path, default=Path("/tmp/notebook-uneven.jsonl"))
    p.add_argument("--rows", type=int, default=2000, help="rows of instruction_data.py (60 steps use 480)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("notebook_curves.json"))
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--timeout", type=int, default=1800)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import instruction_data
    from bench_train import ENV, write_model_dir
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    write_model_dir(args.shape, args.model_dir, args.tokenizer)
    tokenizer = AutoTokenizer.from_pretrained(str(args.model_dir))
    rows = instruction_data.make_rows(args.rows, args.seed, tokenizer)
    args.data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"[notebook_gpu] model directory and {len(rows)} rows ready in {time.perf_counter() - t0:.1f} s",
          flush=True)
    results = {}
    for stack in args.stacks:
        cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--model-dir", str(args.model_dir),
               "--data", str(args.data)]
        proc = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True,
                              timeout=args.timeout)
        found = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if not found:
            print(f"[notebook_gpu] {stack} failed:\n" + "\n".join(proc.stderr.strip().splitlines()[-15:]))
            continue
        results[stack] = found[0]
        r = found[0]
        print(f"[notebook_gpu] {stack}: trainer.train() {r['train_runtime']:.1f} s, notebook "
              f"{r['notebook_s']:.1f} s, train loss {r['training_loss']:.4f}, peak "
              f"{r['peak_gib'] or 0:.2f} GiB", flush=True)
    args.out.write_text(json.dumps(results, indent=1))
    compare(results)
    if args.plot and results:
        plot(results, args.plot)
        print(f"[notebook_gpu] curves in {args.plot}")


if __name__ == "__main__":
    main()
