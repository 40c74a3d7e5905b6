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
                         num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
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
    import torch

    from fasttune.lora.apply import apply_lora
    from fasttune.models.hf import llama_config_from_hf
    from fasttune.models.llama import LlamaForCausalLM
    from fasttune.models.quantize import quantize_model
    from transformers import LlamaConfig

    cfg = llama_config_from_hf(LlamaConfig(**SHAPES[args.shape]))
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg, use_kernels=args.kernels)
    model.to_empty(device="cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.to(torch.bfloat16)
    if args.mode == "qlora":
        quantize_model(model, bits=4, compute_dtype=torch.bfloat16)
    apply_lora(model, r=16, lora_alpha=16, target_modules=TARGETS)
    model.set_gradient_checkpointing(args.checkpointing)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x):
        targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
        out = model(input_ids=x, targets=targets)
        (out.loss_sum / out.n_tokens).backward()
        return out.loss_sum / out.n_tokens

    return model, params, step


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
    model = AutoModelForCausalLM.from_pretrained(str(args.model_dir), dtype=torch.bfloat16, device_map={"": 0},
                                                 attn_implementation="sdpa", **kw)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             task_type="CAUSAL_LM"))
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    return model, params, step


def build_unsloth(args):
    from unsloth import FastLanguageModel  # must be the first import of the process
    import torch

    model, _tok = FastLanguageModel.from_pretrained(str(args.model_dir), max_seq_length=args.seq, dtype=torch.bfloat16,
                                                    load_in_4bit=args.mode == "qlora")
    model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS,
                                             use_gradient_checkpointing="unsloth", random_state=3407)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        return loss

    return model, params, step


def worker(args) -> dict:
    if args.stack == "unsloth":
        model, params, step = build_unsloth(args)
    import bitsandbytes as bnb
    import torch

    if args.stack == "fasttune":
        model, params, step = build_fasttune(args)
    elif args.stack in ("hf", "liger"):
        model, params, step = build_hf(args, liger=args.stack == "liger")
    opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    batches = [b.cuda() for b in fixed_batches(args.batch, args.seq, args.warmup + args.steps)]
    torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for i, x in enumerate(batches):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = step(x)
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses.append(float(loss))
        if i >= args.warmup:
            times.append(dt)
    med = statistics.median(times)
    return {"stack": args.stack, "shape": args.shape, "mode": args.mode, "batch": args.batch, "seq": args.seq,
            "checkpointing": args.checkpointing if args.stack == "fasttune" else "on",
            "tokens_per_s": args.batch * args.seq / med, "step_s": med,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "losses": losses,
            "gpu": torch.cuda.get_device_name(), "torch": torch.__version__}


# ---- the orchestrator -------------------------------------------------------------------------

def run_one(stack: str, mode: str, batch: int, seq: int, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--stack", stack, "--mode", mode, "--batch", str(batch),
           "--seq", str(seq), "--shape", args.shape, "--model-dir", str(args.model_dir),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--checkpointing", args.checkpointing]
    if not args.kernels:
        cmd.append("--no-kernels")
    env = {**os.environ, **ENV}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    log = Path(args.log_dir) / f"{stack}-{mode}-{batch}x{seq}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
            res["wall_s"] = time.time() - t0
            return res
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    oom = "OutOfMemory" in proc.stderr or "out of memory" in proc.stderr
    return {"stack": stack, "mode": mode, "batch": batch, "seq": seq, "error": "OOM" if oom else " | ".join(tail)}


def print_table(rows: list[dict]) -> None:
    print(f"{'stack':10} {'mode':6} {'batch x seq':>12} {'tok/s':>9} {'peak GiB':>9} {'vs unsloth':>10} {'vs hf':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['stack']:10} {r['mode']:6} {r['batch']:>5} x {r['seq']:<5} ERROR {r['error'][:80]}")
            continue
        ref = {s["stack"]: s for s in rows if "error" not in s and s["mode"] == r["mode"]
               and s["batch"] == r["batch"] and s["seq"] == r["seq"]}
        vs_u = r["tokens_per_s"] / ref["unsloth"]["tokens_per_s"] if "unsloth" in ref else float("nan")
        vs_h = r["tokens_per_s"] / ref["hf"]["tokens_per_s"] if "hf" in ref else float("nan")
        print(f"{r['stack']:10} {r['mode']:6} {r['batch']:>5} x {r['seq']:<5} {r['tokens_per_s']:9.0f} "
              f"{r['peak_gib']:9.2f} {vs_u:10.2f} {vs_h:7.2f}")


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
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--checkpointing", default="on", help="fasttune's activation strategy")
    p.add_argument("--no-kernels", dest="kernels", action="store_false")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/bench-model"))
    p.add_argument("--tokenizer", type=Path, default=Path(".bench_assets/tokenizer"))
    p.add_argument("--out", type=Path, default=Path("bench_results.jsonl"))
    p.add_argument("--log-dir", default="bench_logs")
    p.add_argument("--timeout", type=int, default=900)
    args = p.parse_args()
    if args.worker:
        print("RESULT " + json.dumps(worker(args)), flush=True)
        return
    if any(s != "fasttune" for s in args.stacks):
        write_model_dir(args.shape, args.model_dir, args.tokenizer)
    rows = []
    for mode in args.modes:
        for batch in args.batches:
            for stack in args.stacks:
                res = run_one(stack, mode, batch, args.seq, args)
                rows.append(res)
                with args.out.open("a") as f:
                    f.write(json.dumps(res) + "\n")
                print(json.dumps({k: v for k, v in res.items() if k != "losses"}), flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
