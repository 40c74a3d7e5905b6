"""Decoding speed at batch 1: fasttune's generate (static KV cache; eager, CUDA graph, torch.compile; the
fused step and the model's own, '-unfused'; the pipelined loop and, '-sync', the loop that waits for every
token before it queues the next step) against transformers' generate (eager, dynamic cache), on the same
random weights.

    python benchmarks/bench_decode.py                         # Llama-3.1-8B shape, bf16, CUDA
    python benchmarks/bench_decode.py --shape tiny            # CPU smoke run of the harness

One process: our model is built once (random weights; speed does not depend on their values) and its
q/k/v and gate/up weights are packed for the fused step (`fasttune.infer.decode_weights`, timed, memory
before/after printed) before the transformers model takes its weight tensors (same names, `assign=True`),
so every stack decodes the same tensors; the '-unfused' stacks run the model's own step on those same
(packed, still contiguous) weights. A one-step check compares the fused step's logits with the unfused ones.
Each stack decodes `--new-tokens` tokens after a `--prompt`-token prompt with EOS disabled; the first run
warms up (and compiles), the best of `--repeats` timed runs counts. tokens/s = new tokens / wall time of
the whole generate call (prefill included, as a user sees it); decode tokens/s leaves the prefill out.
A row is printed as soon as it is measured; JSON lines go to `--out`; the table comes last.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback

TINY = dict(model_type="llama", vocab_size=49152, hidden_size=256, intermediate_size=688, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=64, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=4096, tie_word_embeddings=False)
STACKS = ("hf", "fasttune-eager", "fasttune-cuda_graph-unfused", "fasttune-compile-unfused",
          "fasttune-cuda_graph-sync", "fasttune-cuda_graph", "fasttune-compile")
# eager is left out of the CUDA default, as the slowest by far; cuda_graph-sync reuses cuda_graph's capture.
CUDA_DEFAULT = ("hf", "fasttune-cuda_graph-unfused", "fasttune-compile-unfused", "fasttune-cuda_graph-sync",
                "fasttune-cuda_graph", "fasttune-compile")


def build(shape: str, device: str, dtype):
    """Our model of `shape` with random weights, built directly in `dtype` on `device` and packed for the
    fused step, and the transformers model of the same family holding the same tensors."""
    import torch
    import transformers

    from fasttune.infer.decode_weights import pack_decode_weights
    from fasttune.models.hf import hf_config_from_llama
    from fasttune.models.llama import LlamaConfig, LlamaForCausalLM
    from fasttune.models.presets import SHAPES

    cfg = LlamaConfig(**(TINY if shape == "tiny" else SHAPES[shape]))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # no fp32 copy of 8B weights
    try:
        with torch.device(device):
            ours = LlamaForCausalLM(cfg, use_kernels=device == "cuda")
    finally:
        torch.set_default_dtype(default)
    ours.eval()
    before = memory_gib(device)
    sync(device)
    t0 = time.perf_counter()
    packed = pack_decode_weights(ours)
    sync(device)
    print(f"packed {packed.n_packed} q/k/v and gate/up groups in {time.perf_counter() - t0:.2f} s; "
          f"GPU memory allocated/reserved GiB before {before}, after {memory_gib(device)}", flush=True)
    hf_cfg = hf_config_from_llama(cfg)
    hf_cfg._attn_implementation = "sdpa"
    with torch.device("meta"):
        hf = transformers.AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
    hf.load_state_dict(ours.state_dict(), strict=False, assign=True)  # the same tensors, no copy
    # The rotary tables are buffers the state dict does not carry: rebuild that module on the device.
    with torch.device(device):
        hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)
    return ours, hf.eval(), cfg


def sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def memory_gib(device: str) -> tuple[float, float] | None:
    """(allocated, reserved) GiB on the GPU, None on the CPU."""
    import torch

    if device != "cuda":
        return None
    return round(torch.cuda.memory_allocated() / 2**30, 2), round(torch.cuda.memory_reserved() / 2**30, 2)


# stack -> generate's `compile`; '-fused' spelled out so that a stack means the same step on any device
MODES = {"fasttune-eager": False, "fasttune-cuda_graph-unfused": "cuda_graph-unfused",
         "fasttune-compile-unfused": "compile-unfused", "fasttune-cuda_graph-sync": "cuda_graph-fused",
         "fasttune-cuda_graph": "cuda_graph-fused", "fasttune-compile": "compile-fused"}
# '-sync': generate's loop waits for each token before it queues the next step (pipeline=False); the same
# step as the stack without the suffix, to measure what the pipelined loop's overlap buys.
SYNC_LOOP = {"fasttune-cuda_graph-sync"}


def twin(stack: str) -> str:
    """The stack a row's tokens are compared with: the same loop over the model's own step ('-unfused'),
    or for a '-sync' stack the same step in the pipelined loop."""
    return stack.removesuffix("-sync") if stack in SYNC_LOOP else stack + "-unfused"


def decode_once(stack: str, ours, hf, prompt, n: int):
    """One generate call of `stack`: (output ids, GenerationStats or None)."""
    import torch

    from fasttune.infer.generate import GenerationStats, generate

    if stack == "hf":
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, eos_token_id=None, pad_token_id=0)
        return out, None
    stats = GenerationStats()
    out = generate(ours, prompt, max_new_tokens=n, eos_token_ids=[], compile=MODES[stack], stats=stats,
                   pipeline=False if stack in SYNC_LOOP else None)
    return out, stats


def run_stack(stack: str, ours, hf, prompt, args) -> dict:
    import torch

    n = args.new_tokens
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    runs = []
    for _ in range(1 + args.repeats):  # the first run warms up (and compiles or captures)
        sync(args.device)
        t0 = time.perf_counter()
        out, stats = decode_once(stack, ours, hf, prompt, n)
        sync(args.device)
        runs.append((time.perf_counter() - t0, stats))
    (warmup, _), timed_runs = runs[0], runs[1:]
    seconds, stats = min(timed_runs, key=lambda r: r[0])
    row = {"stack": stack, "shape": args.shape, "device": device_name(args.device), "dtype": args.dtype,
           "prompt": args.prompt, "new_tokens": n, "seconds": round(seconds, 4),
           "tokens_per_s": round(n / seconds, 2), "first_run_s": round(warmup, 2)}
    if stats is not None and stats.decode_s:
        # decode_s: wall time from the first token on the host to the last
        row["decode_tokens_per_s"] = round((stats.new_tokens - 1) / stats.decode_s, 2)
    if stack != "hf":
        row["pipelined"] = args.device == "cuda" and stack not in SYNC_LOOP
    if args.device == "cuda":
        row["peak_allocated_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    row["tokens"] = out[0, prompt.shape[1]:].tolist()
    return row


def check_fused_step(ours, prompt) -> dict:
    """One decoding step after the same prefill, the model's step against the fused one (eager, no graph):
    the largest logit difference, next to the largest logit (bf16 rounds at ~1/256 of it)."""
    import torch

    from fasttune.infer.decode_weights import pack_decode_weights
    from fasttune.infer.static_decode import StaticKV, decode_step, fused_decode_step

    T = prompt.shape[1]
    packed = pack_decode_weights(ours)  # already packed at build: no copy
    logits = []
    with torch.no_grad():
        for step, extra in ((decode_step, ()), (fused_decode_step, (packed,))):
            static = StaticKV(ours, 1, T + 16)
            mask = torch.ones_like(prompt, dtype=torch.bool)
            pos = torch.arange(T, device=prompt.device)[None]
            ours(prompt, position_ids=pos, attention_mask=mask.long(), kv_cache=static.start(mask))
            token = prompt[:, -1:]
            logits.append(step(ours, static, token, pos[:, -1:] + 1, torch.tensor([T], device=prompt.device),
                               *extra))
    ref, got = logits
    return {"check": "fused_vs_unfused_step_logits", "max_abs_diff": float((got - ref).abs().max()),
            "max_abs_logit": float(ref.abs().max()), "same_argmax": bool(torch.equal(got.argmax(-1),
                                                                                     ref.argmax(-1)))}


def device_name(device: str) -> str:
    import torch

    return torch.cuda.get_device_name() if device == "cuda" else "cpu"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="llama-3.1-8b", help="a fasttune.models.presets SHAPES name, or tiny "
                                                           "(default: llama-3.1-8b)")
    p.add_argument("--stacks", nargs="+", default=None, choices=STACKS,
                   help="what to run (default: all on CUDA; hf and fasttune-eager on the CPU)")
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens (default: 32)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens to generate (default: 128)")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed runs after the warm-up; the best counts (default: 2)")
    p.add_argument("--dtype", default=None, choices=("bf16", "fp16", "fp32"),
                   help="weights dtype (default: bf16 on CUDA, fp32 on the CPU)")
    p.add_argument("--out", default=None, help="append one JSON line per stack to this file (default: none)")
    args = p.parse_args(argv)

    import torch

    args.device = "cuda" if torch.cuda.is_available() else "cpu"
    args.dtype = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    stacks = args.stacks or (list(CUDA_DEFAULT) if args.device == "cuda" else ["hf", "fasttune-eager"])
    torch.manual_seed(0)
    t0 = time.perf_counter()
    ours, hf, cfg = build(args.shape, args.device, dtype)
    billions = sum(p.numel() for p in ours.parameters()) / 1e9
    print(f"built {args.shape} ({billions:.2f}B parameters, {args.dtype}, {device_name(args.device)}) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    prompt = torch.randint(0, cfg.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    prompt = prompt.to(args.device)

    check = check_fused_step(ours, prompt)
    print(json.dumps(check), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(check) + "\n")

    rows = []
    for stack in stacks:
        try:
            with torch.no_grad():
                row = run_stack(stack, ours, hf, prompt, args)
        except Exception as e:  # one stack failing must not hide the others' numbers
            traceback.print_exc()
            row = {"stack": stack, "shape": args.shape, "error": f"{type(e).__name__}: {e}"}
        rows.append(row)
        shown = {k: v for k, v in row.items() if k != "tokens"}
        print(json.dumps(shown), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(shown) + "\n")
        gc.collect()
        if args.device == "cuda":
            torch.cuda.empty_cache()

    tokens = {r["stack"]: r["tokens"] for r in rows if "tokens" in r}

    def same(stack: str, ref: str) -> str:
        if stack == ref or ref not in tokens or stack not in tokens:
            return "-"
        a, b = tokens[stack], tokens[ref]
        return f"{sum(x == y for x, y in zip(a, b))}/{len(b)}"

    print(f"\ndecoding at batch 1, {args.shape}, {args.dtype}, {device_name(args.device)}, "
          f"prompt {args.prompt}, {args.new_tokens} new tokens (best of {args.repeats}); fused step vs "
          f"unfused, one step: max |logit diff| {check['max_abs_diff']:.3g} (max |logit| "
          f"{check['max_abs_logit']:.3g}), same argmax {check['same_argmax']}")
    print(f"{'stack':<30}{'tokens/s':>10}{'decode tok/s':>14}{'first run s':>13}{'peak GiB':>10}"
          f"{'same tokens as hf':>19}{'as twin':>9}")
    for r in rows:
        if "error" in r:
            print(f"{r['stack']:<30}  error: {r['error'][:80]}")
            continue
        decode = r.get("decode_tokens_per_s")
        peak = r.get("peak_allocated_gib")
        print(f"{r['stack']:<30}{r['tokens_per_s']:>10.1f}{(f'{decode:.1f}' if decode else '-'):>14}"
              f"{r['first_run_s']:>13.1f}{(f'{peak:.1f}' if peak else '-'):>10}{same(r['stack'], 'hf'):>19}"
              f"{same(r['stack'], twin(r['stack'])):>9}")
    print("twin: the same stack over the model's own step (-unfused); for -sync, the pipelined loop")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
