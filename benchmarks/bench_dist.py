"""Training speed and peak memory on several GPUs under torchrun: fasttune's DDP and FSDP2.

Each measurement is one process group running fasttune's own training loop (`train_loop`, the path
`fasttune train` takes under torchrun: the global batch sliced per rank, tokens all-reduced, DDP or FSDP2)
on fixed random batches of a model shape with random weights (speed does not depend on their values):
LoRA r=16 alpha=16 on all seven projections, bf16 compute, `gradient_checkpointing: offload`,
`--batch` x `--seq` tokens per GPU per step. tokens/s = the tokens of all ranks over a step's time, median
over `--steps` steps after `--warmup`; peak = the largest torch.cuda.max_memory_allocated of the ranks.

    python benchmarks/bench_dist.py --suite scaling  --out d.jsonl   # Llama-3.1-8B, bf16, QLoRA, 1/2/4 GPUs
    python benchmarks/bench_dist.py --suite overhead --out d.jsonl   # one process vs torchrun, world size 1
    python benchmarks/bench_dist.py --suite 70b      --out d.jsonl   # Llama-3.1-70B QLoRA, FSDP2, 2 GPUs

'scaling' runs DDP (the base fits one GPU) and prints the speed-up over one GPU of the same mode (targets:
1.9x on 2 GPUs, 3.7x on 4). 'overhead' runs the same job as a plain process and under torchrun with one
rank (NCCL, DDP): the distributed path's cost. '70b' builds the 70B shape layer by layer, each layer's
linears quantised to NF4 as they are made, so no rank ever holds it in 16 bits. The optimiser is torch's
AdamW (bitsandbytes' 8-bit AdamW does not step FSDP2's sharded tensors; LoRA's state is small either way).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import SHAPES, TARGETS, build_fasttune, configure_fasttune, fixed_batches  # noqa: E402

SHAPE_70B = dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                 num_attention_heads=64, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                 rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                 max_position_embeddings=131072, tie_word_embeddings=False)
ALL_SHAPES = {**SHAPES, "llama-3.1-70b": SHAPE_70B}


# ---- one measurement: every rank runs this ------------------------------------------------------

class RandomStream:
    """Endless fixed random micro-batches of `batch` x `seq` tokens (different on each rank), in the batch
    contract of docs/ARCHITECTURE.md."""

    def __init__(self, batch: int, seq: int, vocab: int, rank: int, n: int = 4) -> None:
        import torch

        self.batches = []
        for x in fixed_batches(batch, seq, n, min(vocab, 49152), seed=rank):
            targets = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
            self.batches.append({"input_ids": x, "targets": targets})
        self.i = 0

    def __next__(self):
        self.i += 1
        return self.batches[(self.i - 1) % len(self.batches)]

    def __len__(self) -> int:
        return 10**6  # no epoch ends inside a benchmark

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]


def build_layerwise(shape: str, mode: str):
    """Our Llama model of `shape` on this rank's GPU, built one decoder layer at a time with random bf16
    weights, each layer's linears quantised to NF4 (qlora) before the next is made, so the 16-bit model never
    exists whole; LoRA on all seven projections."""
    import dataclasses

    import torch
    from bench_train import shape_config

    from fasttune.lora.apply import apply_lora
    from fasttune.models.hf import llama_config_from_hf
    from fasttune.models.llama import DecoderLayer, LlamaForCausalLM
    from fasttune.models.quantize import quantize_linears

    cfg = llama_config_from_hf(shape_config_of(shape, shape_config))
    dev = torch.device("cuda", torch.cuda.current_device())
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with dev:  # embeddings, final norm, head and RoPE tables; the layers follow one by one
            model = LlamaForCausalLM(dataclasses.replace(cfg, num_hidden_layers=0), use_kernels=True)
            for _ in range(cfg.num_hidden_layers):
                layer = DecoderLayer(cfg, use_kernels=True)
                if mode == "qlora":
                    quantize_linears(layer, "4bit", dev, torch.bfloat16)
                model.model.layers.append(layer)
    finally:
        torch.set_default_dtype(default)
    model.config = model.model.config = cfg
    apply_lora(model, r=16, lora_alpha=16, target_modules=TARGETS)
    model.train()
    return model


def shape_config_of(shape: str, shape_config):
    if shape in SHAPES:
        return shape_config(shape)
    from transformers import AutoConfig

    return AutoConfig.for_model(**{"model_type": "llama", **ALL_SHAPES[shape]}, bos_token_id=1,
                                eos_token_id=2, pad_token_id=0)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from fasttune.config import TrainConfig
    from fasttune.train import distributed as ft_dist
    from fasttune.train.loop import train_loop

    d = ft_dist.setup("cuda")  # None: the plain single process
    if d is not None:
        d.mode = args.distributed
    rank = d.rank if d is not None else 0
    ns = SimpleNamespace(shape=args.shape, mode=args.mode, kernels=True, device="cuda", batch=args.batch,
                         seq=args.seq)
    t0 = time.time()
    model = build_layerwise(args.shape, args.mode) if args.layerwise else build_fasttune(ns)[0]
    built_s = time.time() - t0
    row = configure_fasttune(model, "offload", ns)
    if d is not None and d.mode == "fsdp":
        ft_dist.shard_model(model, d, "bf16")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    records: list[dict] = []
    cfg = TrainConfig(max_steps=args.warmup + args.steps, logging_steps=1, save_steps=0, eval_steps=0,
                      optim="adamw_torch", precision="bf16", lr_scheduler_type="constant", warmup_steps=0,
                      learning_rate=1e-4, gradient_checkpointing="offload")
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as run_dir:
        train_loop(model, params, RandomStream(args.batch, args.seq, model.config.vocab_size, rank), cfg,
                   run_dir, device=torch.device("cuda", torch.cuda.current_device()), precision="bf16",
                   log=lambda s: None, on_record=records.append, dist=d)
    peak = torch.cuda.max_memory_allocated() / 2**30
    peaks = [peak]
    if d is not None:
        peaks = [None] * d.world_size
        dist.all_gather_object(peaks, peak)
    if rank == 0:
        steps = [r["tokens_per_s"] for r in records if r["kind"] == "train"][args.warmup:]
        world, tok_s = (d.world_size if d is not None else 1), statistics.median(steps)
        row.update(shape=args.shape, mode=args.mode, batch=args.batch, seq=args.seq, world_size=world,
                   launch="plain" if d is None else f"torchrun-{d.mode}", tokens_per_s=tok_s,
                   tokens_per_s_per_gpu=tok_s / world, peak_gib_per_gpu=max(peaks),
                   peaks_gib=peaks, build_s=round(built_s, 1), gpu=torch.cuda.get_device_name(),
                   torch=torch.__version__, losses=[r["loss"] for r in records if r["kind"] == "train"])
        print("RESULT " + json.dumps(row), flush=True)
    ft_dist.shutdown()


# ---- the orchestrator ---------------------------------------------------------------------------

def run(args, *, world: int | None, distributed: str, shape: str, mode: str, layerwise: bool = False) -> dict:
    """One measurement: `world` ranks under torchrun, or None for the plain process."""
    worker_args = [__file__, "--worker", "--shape", shape, "--mode", mode, "--batch", str(args.batch),
                   "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
                   "--distributed", distributed] + (["--layerwise"] if layerwise else [])
    launcher = [] if world is None else ["-m", "torch.distributed.run", "--standalone",
                                         f"--nproc-per-node={world}"]
    cmd = [sys.executable, *launcher, *worker_args]
    key = dict(shape=shape, mode=mode, world_size=world or 1, launch="plain" if world is None else
               f"torchrun-{distributed}", batch=args.batch, seq=args.seq)
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    log = Path(args.log_dir) / f"dist-{shape}-{mode}-{key['launch']}-{key['world_size']}.log"
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        out, err = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        out, err = str(e.stdout or ""), f"TIMEOUT after {args.timeout} s"
    log.write_text(out + "\n--- stderr ---\n" + err)
    rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if rows:
        return rows[0]
    return dict(key, error=" | ".join((err or out).strip().splitlines()[-3:]))


def suite(args) -> list[tuple[int | None, str, str, str, bool]]:
    """(world, distributed, shape, mode, layerwise) of each measurement."""
    if args.suite == "scaling":
        return [(w, "ddp", "llama-3.1-8b", m, False) for m in args.modes for w in args.worlds]
    if args.suite == "overhead":
        return [(w, "ddp", "llama-3.1-8b", m, False) for m in args.modes for w in (None, 1)]
    if args.suite == "70b":
        return [(2, "fsdp", "llama-3.1-70b", "qlora", True)]
    raise SystemExit(f"unknown suite {args.suite!r}")


def print_table(rows: list[dict]) -> None:
    print(f"\n  {'shape':14} {'mode':6} {'launch':15} {'GPUs':>4} {'tok/s':>9} {'per GPU':>8} "
          f"{'speed-up':>8} {'peak GiB/GPU':>12}")
    base = {(r["shape"], r["mode"]): r["tokens_per_s"] for r in rows
            if r.get("world_size") == 1 and "tokens_per_s" in r and r.get("launch") != "plain"}
    for r in rows:
        head = f"  {r['shape']:14} {r['mode']:6} {r['launch']:15} {r['world_size']:>4}"
        if "error" in r:
            print(f"{head} ERROR {r['error'][:90]}")
            continue
        ref = base.get((r["shape"], r["mode"]))
        up = f"{r['tokens_per_s'] / ref:8.2f}" if ref and r["launch"] != "plain" else f"{'':8}"
        print(f"{head} {r['tokens_per_s']:9.0f} {r['tokens_per_s_per_gpu']:8.0f} {up} "
              f"{r['peak_gib_per_gpu']:12.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--suite", default="scaling", choices=("scaling", "overhead", "70b"))
    p.add_argument("--shape", default="llama-3.1-8b", choices=sorted(ALL_SHAPES))
    p.add_argument("--mode", default="bf16", choices=("bf16", "qlora"))
    p.add_argument("--modes", nargs="+", default=["bf16", "qlora"])
    p.add_argument("--worlds", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--distributed", default="ddp", choices=("ddp", "fsdp"))
    p.add_argument("--layerwise", action="store_true", help="build the model one layer at a time (70B)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench_dist.jsonl"))
    p.add_argument("--log-dir", default="bench_logs")
    p.add_argument("--timeout", type=int, default=1800)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    for world, distributed, shape, mode, layerwise in suite(args):
        row = run(args, world=world, distributed=distributed, shape=shape, mode=mode, layerwise=layerwise)
        rows.append(row)
        with args.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
