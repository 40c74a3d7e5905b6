"""LoRA training on the CPU: fasttune against transformers + PEFT, tokens/s and peak resident memory.

    taskset -c 0,1 python benchmarks/bench_cpu.py --batch 2 --seq 256 --steps 6 --warmup 2

Both stacks read the same weights: by default the embedded SmolLM2-135M-Instruct, converted once by
fasttune's loader from its GGUF into a safetensors directory (`--model-dir` takes any Llama-family
directory instead). Each stack runs in its own process (peak RSS is per process) on the same fixed random
token batches: fp32, LoRA r=16 alpha=16 dropout 0 on q,k,v,o,gate,up,down, torch AdamW (lr 1e-4), no
gradient checkpointing, SDPA attention. A step is forward + backward + optimiser step; the time is the
median of `--steps` steps after `--warmup` steps. fasttune: `load_model` (our Llama, PyTorch reference
ops: the Triton kernels are GPU-only) + `apply_lora`, loss from its chunked linear cross-entropy;
transformers + PEFT: `AutoModelForCausalLM` + `get_peft_model`, `labels=` loss. Peak RSS =
getrusage's ru_maxrss over the whole process (loading included); `rss_after_load` is VmRSS once the
model and adapters are built. `loss0` (first step) agrees between stacks when both hold the same weights.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def proc_status_mib(field: str) -> float | None:
    """VmRSS (now) or VmHWM (peak) of this process from /proc, in MiB; None off Linux.

    VmHWM belongs to the address space, which exec replaces, so it starts afresh in each worker; getrusage's
    ru_maxrss does not: it keeps the parent's peak across fork + exec (the fallback elsewhere).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def peak_rusage_mib() -> float:
    """getrusage's ru_maxrss in MiB (KiB on Linux and BSD, bytes on macOS), where /proc has no VmHWM."""
    import resource  # POSIX only: imported where it is read

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 1024)


def build(stack: str, model_dir: Path):
    """(model, trainable params, step(x) -> loss) for one stack; the loss is the mean over shifted tokens."""
    import torch

    if stack == "fasttune":
        from fasttune.config import ModelConfig
        from fasttune.lora.apply import apply_lora
        from fasttune.models.loading import load_model

        loaded = load_model(ModelConfig(model_name=str(model_dir), dtype="fp32", use_kernels="off"), "cpu")
        model = loaded.model
        apply_lora(model, r=16, lora_alpha=16, target_modules=TARGETS)
        model.set_gradient_checkpointing("off")

        def step(x):
            targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)  # (B, T), last ignored
            out = model(input_ids=x, targets=targets)
            loss = out.loss_sum / out.n_tokens
            loss.backward()
            return loss.detach()
    elif stack == "hf":
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                     attn_implementation="sdpa")
        lora = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                          task_type="CAUSAL_LM")
        model = get_peft_model(model, lora)

        def step(x):
            loss = model(input_ids=x, labels=x).loss  # transformers shifts the labels itself
            loss.backward()
            return loss.detach()
    else:
        raise ValueError(f"stack {stack!r}: expected fasttune or hf")
    model.train()
    return model, [p for p in model.parameters() if p.requires_grad], step


def worker(stack: str, model_dir: Path, batch: int, seq: int, steps: int, warmup: int) -> dict:
    """Build one stack, train warmup + steps steps; the measurement row."""
    import torch

    t0 = time.perf_counter()
    model, params, step = build(stack, model_dir)
    load_s = time.perf_counter() - t0
    rss_load = proc_status_mib("VmRSS")
    load_avg = os.getloadavg()[0]  # other work on the machine shows up here, and in the step times
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, vocab, (batch, seq), generator=g) for _ in range(warmup + steps)]
    opt = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for i, x in enumerate(batches):
        t = time.perf_counter()
        loss = step(x)
        opt.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        losses.append(float(loss))
        if i >= warmup:
            times.append(dt)
    step_s = statistics.median(times)
    peak = proc_status_mib("VmHWM") or peak_rusage_mib()
    return {"stack": stack, "batch": batch, "seq": seq, "steps": steps, "warmup": warmup,
            "step_s": step_s, "tokens_per_s": batch * seq / step_s, "step_times": times,
            "best_tokens_per_s": batch * seq / min(times),  # least disturbed by other load on the machine
            "loss0": losses[0], "losses": losses, "load_s": load_s, "rss_after_load_mib": rss_load,
            "peak_rss_mib": peak,
            "loadavg_1m": [load_avg, os.getloadavg()[0]],  # before and after the steps
            "trainable": sum(p.numel() for p in params), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def default_model_dir() -> Path:
    """The embedded SmolLM2-135M-Instruct as a safetensors directory (converted from its GGUF once)."""
    from fasttune.config import ModelConfig
    from fasttune.models.loading import resolve_source

    return resolve_source(ModelConfig(model_name="smollm2-135m"))


def run_stack(stack: str, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", stack, "--model-dir", str(args.model_dir), "--batch",
           str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    env = {**os.environ, **ENV}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    rows = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if rows:
        return rows[0]
    tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
    return {"stack": stack, "batch": args.batch, "seq": args.seq, "error": tail or f"exit {proc.returncode}"}


def print_table(rows: list[dict]) -> None:
    """A line per process, then per stack the median over its repeats and the ratio to transformers + PEFT."""
    print(f"{'stack':10} {'run':>3} {'batch x seq':>11} {'tok/s':>8} {'best':>8} {'step s':>7} "
          f"{'peak RSS MiB':>12} {'load avg':>8} {'loss0':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['stack']:10} {r.get('run', 0):>3} ERROR {r['error'][:100]}")
            continue
        print(f"{r['stack']:10} {r.get('run', 0):>3} {r['batch']:>4} x {r['seq']:<4} "
              f"{r['tokens_per_s']:8.1f} {r['best_tokens_per_s']:8.1f} {r['step_s']:7.3f} "
              f"{r['peak_rss_mib']:12.0f} {max(r['loadavg_1m']):8.1f} {r['loss0']:8.4f}")
    ok = [r for r in rows if "error" not in r]
    med = {s: statistics.median(r["tokens_per_s"] for r in ok if r["stack"] == s)
           for s in dict.fromkeys(r["stack"] for r in ok)}
    for s, tps in med.items():
        vs = f"{tps / med['hf']:.2f}x transformers + PEFT" if "hf" in med else ""
        print(f"median {s:10} {tps:8.1f} tokens/s  {vs}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--stacks", nargs="+", default=["fasttune", "hf"])
    p.add_argument("--model-dir", type=Path, default=None, help="default: the embedded SmolLM2-135M")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1, help="run the stacks this many times, alternating, "
                   "so that other load on the machine falls on both")
    p.add_argument("--timeout", type=int, default=1200)
    p.add_argument("--out", type=Path, default=None, help="append one JSON line per stack")
    args = p.parse_args(argv)
    if args.worker:
        row = worker(args.worker, args.model_dir, args.batch, args.seq, args.steps, args.warmup)
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    args.model_dir = args.model_dir or default_model_dir()
    cpu = platform.processor() or platform.machine()
    print(f"model {args.model_dir}, {len(os.sched_getaffinity(0))} usable cores ({cpu})", flush=True)
    rows = []
    for run in range(args.repeats):
        for stack in args.stacks:
            row = dict(run_stack(stack, args), run=run)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
            if args.out:
                with args.out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print_table(rows)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
