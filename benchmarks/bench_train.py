"""Side-by-side LoRA/QLoRA training speed and peak memory: fasttune against its peers.

Each stack runs in its own process on the same fixed random batches and the same model shape with
random weights (speed does not depend on their values): LoRA r=16 alpha=16 on q,k,v,o,gate,up,down,
bitsandbytes AdamW 8-bit, bf16 compute, gradient checkpointing on, median of `--steps` steps after
`--warmup` steps, peak = torch.cuda.max_memory_allocated.

    python benchmarks/bench_train.py --stacks fasttune hf liger unsloth --shape llama-3.1-8b \
        --modes bf16 qlora --batches 2 8 --seq 2048 --out results.jsonl

The peers load from a directory (`--model-dir`, written once with save_pretrained from random
weights and the tokenizer in `--tokenizer`). fasttune builds the same shape directly.
One line of JSON per measurement goes to `--out`; the last lines printed are the table.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

SHAPES = {
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                         rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                         max_position_embeddings=131072, tie_word_embeddings=False),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, rope_theta=10000.0,
                       rope_scaling=None, max_position_embeddings=4096, tie_word_embeddings=False),
    # small shapes to smoke-test the harness itself
    "tiny": dict(vocab_size=49152, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
                 rope_scaling=None, max_position_embeddings=4096, tie_word_embeddings=False),
}

ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "UNSLOTH_DISABLE_STATISTICS": "1", "DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}


def fixed_batches(batch: int, seq: int, n: int, vocab_limit: int = 49152, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab_limit, (batch, seq), generator=g) for _ in range(n)]


def write_model_dir(shape: str, model_dir: Path, tokenizer_dir: Path) -> None:
    """Random-weight checkpoint of `shape` for the stacks that only load from a directory."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (model_dir / "config.json").exists():
        return
    cfg = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(model_dir, max_shard_size="5GB")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(model_dir)
    del model
    torch.cuda.empty_cache()


# ---- one stack, one process -------------------------------------------------------------------

def build_fasttune(args):
    """Our Llama of `args.shape`, random weights, built in bf16 on the GPU; NF4 for qlora; LoRA on all 7."""
    import torch
    from transformers import LlamaConfig

    from fasttune.lora.apply import apply_lora
    from fasttune.models.hf import llama_config_from_hf
    from fasttune.models.llama import LlamaForCausalLM
    from fasttune.models.quantize import quantize_linears

    cfg = llama_config_from_hf(LlamaConfig(**SHAPES[args.shape]))
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 directly: no fp32 copy of 8B weights
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg, use_kernels=args.kernels)
    finally:
        torch.set_default_dtype(default)
    if args.mode == "qlora":
        quantize_linears(model, "4bit", "cuda", torch.bfloat16)
    apply_lora(model, r=16, lora_alpha=16, target_modules=TARGETS)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x):
        targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
        out = model(input_ids=x, targets=targets)
        loss = out.loss_sum / out.n_tokens
        loss.backward()
        return loss.detach()

    return model, params, step


def configure_fasttune(model, variant: str, args) -> dict:
    """Apply one variant, e.g. 'offload', 'on+ref' (kernels off), 'selective:4', 'budget:19.6+flex'.

    First token: off | on | offload | selective:K | budget:GiB (selective, K from the memory estimate).
    Then any of: ref (PyTorch references instead of the kernels), flex / sdpa (attention backend),
    plain (offloading modes recompute whole layers through torch's checkpoint, not in halves).
    """
    from fasttune.models.attention import set_attention_backend
    from fasttune.models.memory import GiB, estimate_memory, plan_keep_layers

    head, *flags = variant.split("+")
    mode, _, arg = head.partition(":")
    kernels = "ref" not in flags
    model.set_use_kernels(kernels)
    set_attention_backend("flex" if "flex" in flags else "sdpa" if "sdpa" in flags else "auto")
    est_kw = dict(batch=args.batch, seq=args.seq, quantization="4bit" if args.mode == "qlora" else None,
                  r=16, use_kernels=kernels)
    keep = 0
    if mode == "budget":
        keep = plan_keep_layers(model.config, budget_bytes=int(float(arg) * GiB), **est_kw)
        mode = "selective"
    elif mode == "selective":
        keep = int(arg or 0)
    model.set_gradient_checkpointing(mode, keep_layers=keep)
    model.model.recompute_halves = "plain" not in flags
    est = estimate_memory(model.config, checkpointing=mode, keep_layers=keep, **est_kw)
    print(f"[{variant}] keep_layers={keep} {est.describe()}", flush=True)
    return {"variant": variant, "checkpointing": mode, "keep_layers": keep, "kernels": kernels,
            "est_gib": est.total / GiB}


def build_hf(args, liger: bool):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if liger:
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama()
    kw = {}
    if args.mode == "qlora":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.bfloat16,
                                                 device_map={"": 0}, attn_implementation="sdpa", **kw)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    model.train()  # from_pretrained returns eval mode, where transformers skips gradient checkpointing
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    return model, params, step


def build_unsloth(args):
    from unsloth import FastLanguageModel  # noqa: I001  (must be the first import of the process)
    import torch

    model, _tok = FastLanguageModel.from_pretrained(str(args.model_dir), max_seq_length=args.seq,
                                                    dtype=torch.bfloat16, load_in_4bit=args.mode == "qlora")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0,
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=3407)
    # Training mode, as Unsloth's trainer sets it: in eval mode its checkpointing is off (75 GiB at 8 x 2048).
    FastLanguageModel.for_training(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    return model, params, step


def time_steps(params, step, batches, warmup: int, profile: str | None = None) -> dict:
    """Median step time after `warmup` steps and the peak memory from the first step (optimiser included)."""
    import bitsandbytes as bnb
    import torch

    opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, x in enumerate(batches):
        prof = None
        if profile and i == warmup:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                      torch.profiler.ProfilerActivity.CPU])
            prof.__enter__()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(x)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if prof is not None:
            prof.__exit__(None, None, None)
            avg = prof.key_averages()
            try:
                table = avg.table(sort_by="self_device_time_total", row_limit=70)
            except (AttributeError, KeyError, ValueError):
                table = avg.table(sort_by="self_cuda_time_total", row_limit=70)
            Path(profile).write_text(f"step {dt:.3f} s\n" + table)
        losses.append(float(loss))
        if i >= warmup and prof is None:
            times.append(dt)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() / 2**30
    del opt
    return {"step_s": med, "peak_gib": peak, "losses": losses}


def worker(args) -> list[dict]:
    if args.stack == "unsloth":
        model, params, step = build_unsloth(args)
    import torch

    if args.stack == "fasttune":
        model, params, step = build_fasttune(args)
    elif args.stack in ("hf", "liger"):
        model, params, step = build_hf(args, liger=args.stack == "liger")
    # Ids below both the peers' tokenizer (49,152) and the model's vocabulary (Llama-2: 32,000).
    limit = min(49152, SHAPES[args.shape]["vocab_size"])
    batches = [b.cuda() for b in fixed_batches(args.batch, args.seq, args.warmup + args.steps, limit)]
    base = {"stack": args.stack, "shape": args.shape, "mode": args.mode, "batch": args.batch, "seq": args.seq,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "training_mode": model.training}
    variants = args.variants if args.stack == "fasttune" else ["peer"]
    rows = []
    for n, variant in enumerate(variants):
        row = dict(base, variant=variant, checkpointing="on")
        try:
            if args.stack == "fasttune":
                row.update(configure_fasttune(model, variant, args))
            profile = args.profile if n == 0 else None
            row.update(time_steps(params, step, batches, args.warmup, profile))
            row["tokens_per_s"] = args.batch * args.seq / row["step_s"]
        except torch.cuda.OutOfMemoryError:
            row["error"] = "OOM"
        except Exception as e:  # one broken variant must not cost the others their numbers
            import traceback

            traceback.print_exc()
            row["error"] = f"{type(e).__name__}: {e}"[:300]
        for p in params:
            p.grad = None
        gc.collect()
        torch.cuda.empty_cache()
        print("RESULT " + json.dumps(row), flush=True)
        rows.append(row)
    return rows


# ---- the orchestrator -------------------------------------------------------------------------

def run_one(stack: str, mode: str, batch: int, seq: int, args) -> list[dict]:
    """One worker process; its RESULT lines (one per fasttune variant), or one error row."""
    cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--mode", mode, "--batch", str(batch),
           "--seq", str(seq), "--shape", args.shape, "--model-dir", str(args.model_dir),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--variants", *args.variants]
    if args.profile and stack == "fasttune":
        cmd += ["--profile", str(Path(args.log_dir) / f"profile-{mode}-{batch}x{seq}.txt")]
    env = {**os.environ, **ENV}
    t0 = time.time()
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    log = Path(args.log_dir) / f"{stack}-{mode}-{batch}x{seq}.log"
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = "TIMEOUT\n" + (e.stderr.decode() if isinstance(e.stderr, bytes) else (e.stderr or ""))
    log.write_text(out + "\n--- stderr ---\n" + err)
    rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    for r in rows:
        r["wall_s"] = time.time() - t0
    if rows:
        return rows
    tail = (err or out).strip().splitlines()[-3:]
    oom = "OutOfMemory" in err or "out of memory" in err
    return [{"stack": stack, "mode": mode, "batch": batch, "seq": seq, "variant": "-",
             "error": "OOM" if oom else " | ".join(tail)}]


def _label(r: dict) -> str:
    return r["stack"] if r["stack"] != "fasttune" else f"fasttune[{r.get('variant', '')}]"


def print_table(rows: list[dict]) -> None:
    print(f"{'stack':34} {'mode':6} {'batch x seq':>12} {'tok/s':>9} {'peak GiB':>9} {'est GiB':>8} "
          f"{'vs unsloth':>10} {'vs hf':>7}")
    for r in rows:
        label = _label(r)
        if "error" in r:
            print(f"{label:34} {r['mode']:6} {r['batch']:>5} x {r['seq']:<6} ERROR {r['error'][:80]}")
            continue
        ref = {s["stack"]: s for s in rows if "error" not in s and s["mode"] == r["mode"]
               and s["batch"] == r["batch"] and s["seq"] == r["seq"] and s["stack"] != "fasttune"}
        vs_u = r["tokens_per_s"] / ref["unsloth"]["tokens_per_s"] if "unsloth" in ref else float("nan")
        vs_h = r["tokens_per_s"] / ref["hf"]["tokens_per_s"] if "hf" in ref else float("nan")
        est = f"{r['est_gib']:8.2f}" if "est_gib" in r else f"{'':8}"
        print(f"{label:34} {r['mode']:6} {r['batch']:>5} x {r['seq']:<6} {r['tokens_per_s']:9.0f} "
              f"{r['peak_gib']:9.2f} {est} {vs_u:10.2f} {vs_h:7.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--stack", default="fasttune")
    p.add_argument("--stacks", nargs="+", default=["fasttune", "hf", "liger", "unsloth"])
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    p.add_argument("--mode", default="bf16")
    p.add_argument("--modes", nargs="+", default=["bf16", "qlora"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batches", nargs="+", type=int, default=[2, 8])
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--seqs", nargs="+", type=int, default=None, help="several lengths (default: --seq)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["offload"],
                   help="fasttune configurations run in one process (see configure_fasttune)")
    p.add_argument("--no-kernels", dest="kernels", action="store_false")
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # 'cpu': a dry run of the builder
    p.add_argument("--profile", default=None, help="worker: write a profiler table of one step here; "
                   "orchestrator: any value profiles the first fasttune variant of each run")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model"))
    p.add_argument("--tokenizer", type=Path, default=Path(".bench_assets/tokenizer"))
    p.add_argument("--out", type=Path, default=Path("bench_results.jsonl"))
    p.add_argument("--log-dir", default="bench_logs")
    p.add_argument("--timeout", type=int, default=900)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    if any(s != "fasttune" for s in args.stacks):
        write_model_dir(args.shape, args.model_dir, args.tokenizer)
    rows = []
    for mode in args.modes:
        for batch in args.batches:
            for seq in args.seqs or [args.seq]:
                for stack in args.stacks:
                    for res in run_one(stack, mode, batch, seq, args):
                        rows.append(res)
                        with args.out.open("a") as f:
                            f.write(json.dumps(res) + "\n")
                        print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
