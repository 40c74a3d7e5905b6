"""Serving throughput: `fasttune serve`'s continuous batching at 1, 8, 32 and 64 concurrent clients against
transformers' batched `generate` on the same prompts and the same random weights.

    python benchmarks/make_assets.py                       # once: .bench_assets/tokenizer
    python benchmarks/bench_serve.py                       # Llama-3.1-8B shape, bf16, CUDA
    python benchmarks/bench_serve.py --shape tiny --device cpu --clients 1,4 --new-tokens 16   # smoke run

The server (scheduler + app + uvicorn) runs in this process on 127.0.0.1; the clients run in a child process
of their own (`--client-mode`), each one streaming `--requests` completions one after another through the
openai client, all clients started together. Every request sends `--prompt` random token ids and asks for
exactly `--new-tokens` (EOS is disabled on both sides). Reported per client count:
- requests/s: requests completed / wall time of the whole load;
- output tokens/s: generated tokens (the usage each stream reports) / wall time;
- p50 and p99 time to first token: from sending a request to its first streamed chunk with text.
The transformers row for c clients runs `generate` on batches of c of the same prompts (greedy, min = max
new tokens, sdpa attention), tokens/s = c x new tokens / wall time of a batch, best of `--repeats`;
requests/s = c / that time. The last column is our aggregate tokens/s at c clients over ours at 1 client.
JSON lines go to `--out`; the table comes last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# ---- the client process ------------------------------------------------------------------------------


async def _client_load(
    url: str, model: str, prompts: list[list[int]], clients: int, requests: int, new_tokens: int
) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=3600)
    ttfts, tokens, errors = [], [], []

    async def one(i: int) -> None:
        for r in range(requests):
            prompt = prompts[(i * requests + r) % len(prompts)]
            sent, first = time.perf_counter(), None
            try:
                stream = await client.completions.create(
                    model=model,
                    prompt=prompt,
                    max_tokens=new_tokens,
                    temperature=0,
                    stream=True,
                    stream_options={"include_usage": True},
                )
                async for chunk in stream:
                    if first is None and chunk.choices:
                        first = time.perf_counter()
                    if chunk.usage is not None:
                        tokens.append(chunk.usage.completion_tokens)
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
                continue
            ttfts.append((first or time.perf_counter()) - sent)

    start = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(clients)))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "ttft_s": ttfts, "tokens": tokens, "errors": errors}


def client_mode(args: argparse.Namespace) -> None:
    prompts = json.loads(Path(args.prompts_file).read_text())
    result = asyncio.run(
        _client_load(args.client_mode, args.model_id, prompts, args.n_clients, args.requests, args.new_tokens)
    )
    print(json.dumps(result))


# ---- the server and the baseline -----------------------------------------------------------------------


def start_server(model, tokenizer, slots: int, context: int, compile: str):
    import uvicorn

    from fasttune.serve.app import build_app
    from fasttune.serve.protocol import ModelInfo
    from fasttune.serve.scheduler import Scheduler

    scheduler = Scheduler(model, slots=slots, max_len=context, max_queue=4 * slots, compile=compile).start()
    app = build_app(scheduler, ModelInfo("bench", tokenizer, None, [], context), runs_root=None)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server, scheduler


def run_clients(url: str, prompts_file: Path, clients: int, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--client-mode",
        url,
        "--model-id",
        "bench",
        "--prompts-file",
        str(prompts_file),
        "--n-clients",
        str(clients),
        "--requests",
        str(args.requests),
        "--new-tokens",
        str(args.new_tokens),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def hf_batched(hf, prompts: list[list[int]], clients: int, args: argparse.Namespace, device: str) -> float:
    """Best wall time of transformers' generate on one batch of `clients` prompts (all the same length)."""
    import torch
    from bench_decode import sync

    ids = torch.tensor(prompts[:clients], device=device)
    kw = dict(
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=None,
        pad_token_id=0,
        attention_mask=torch.ones_like(ids),
    )
    best = float("inf")
    with torch.no_grad():
        hf.generate(ids, **kw)  # warm-up
        for _ in range(args.repeats):
            sync(device)
            t0 = time.perf_counter()
            out = hf.generate(ids, **kw)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    assert out.shape[1] == ids.shape[1] + args.new_tokens
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="llama-3.1-8b", help="a models.presets.SHAPES name, or tiny")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--clients", default="1,8,32,64", help="comma-separated client counts")
    p.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    p.add_argument("--prompt", type=int, default=128, help="prompt tokens per request")
    p.add_argument("--new-tokens", type=int, default=128, help="generated tokens per request")
    p.add_argument("--compile", default="auto", choices=("auto", "eager", "cuda_graph"))
    p.add_argument("--repeats", type=int, default=2, help="timed transformers batches (best counts)")
    p.add_argument("--skip-hf", action="store_true", help="leave out the transformers rows")
    p.add_argument("--tokenizer", type=Path, default=ROOT / ".bench_assets" / "tokenizer")
    p.add_argument("--out", type=Path, default=ROOT / "bench_serve.jsonl")
    # the client process's own arguments
    p.add_argument("--client-mode", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model-id", default="bench", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", default=None, help=argparse.SUPPRESS)
    p.add_argument("--n-clients", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client_mode:
        client_mode(args)
        return

    import torch
    from bench_decode import build
    from transformers import AutoTokenizer

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[args.dtype]
    counts = [int(c) for c in args.clients.split(",")]
    ours, hf, cfg = build(args.shape, args.device, dtype)
    tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
    g = torch.Generator().manual_seed(0)
    # ids below the tokenizer's size, so that the server's detokenizer reads real tokens
    n_prompts = max(counts) * args.requests
    prompts = torch.randint(
        0, min(len(tokenizer), cfg.vocab_size), (n_prompts, args.prompt), generator=g
    ).tolist()
    prompts_file = args.out.with_suffix(".prompts.json")
    prompts_file.write_text(json.dumps(prompts))
    context = args.prompt + args.new_tokens
    url, server, scheduler = start_server(ours, tokenizer, max(counts), context, args.compile)
    print(
        f"server: {scheduler.slots} slots x {context} tokens, {scheduler.mode} step, "
        f"{args.device} {args.dtype}",
        flush=True,
    )
    rows = []
    run_clients(url, prompts_file, 1, argparse.Namespace(**{**vars(args), "requests": 1}))  # warm-up, capture
    for c in counts:
        r = run_clients(url, prompts_file, c, args)
        if r["errors"]:
            print(f"{c} clients: {len(r['errors'])} errors, first: {r['errors'][0]}", flush=True)
        row = {
            "stack": "fasttune-serve",
            "clients": c,
            "requests": len(r["ttft_s"]),
            "requests_per_s": len(r["ttft_s"]) / r["wall_s"],
            "tokens_per_s": sum(r["tokens"]) / r["wall_s"],
            "ttft_p50_ms": 1000 * statistics.median(r["ttft_s"]),
            "ttft_p99_ms": 1000 * percentile(r["ttft_s"], 0.99),
            "errors": len(r["errors"]),
            "steps": scheduler.steps,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    server.should_exit = True
    scheduler.shutdown()
    if not args.skip_hf:
        for c in counts:
            t = hf_batched(hf, prompts, c, args, args.device)
            row = {
                "stack": "transformers-generate",
                "clients": c,
                "requests_per_s": c / t,
                "tokens_per_s": c * args.new_tokens / t,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    with args.out.open("a") as f:
        for row in rows:
            f.write(
                json.dumps(
                    {
                        **row,
                        "shape": args.shape,
                        "device": args.device,
                        "dtype": args.dtype,
                        "prompt": args.prompt,
                        "new_tokens": args.new_tokens,
                    }
                )
                + "\n"
            )
    ours1 = next(
        (r["tokens_per_s"] for r in rows if r["stack"] == "fasttune-serve" and r["clients"] == 1), None
    )
    print(
        f"\n{'stack':<22} {'clients':>7} {'req/s':>8} {'tokens/s':>10} {'TTFT p50 ms':>12} {'p99 ms':>8} "
        f"{'x 1 client':>10}"
    )
    for r in rows:
        scale = f"{r['tokens_per_s'] / ours1:.1f}" if ours1 and r["stack"] == "fasttune-serve" else ""
        ttft = (
            f"{r['ttft_p50_ms']:>12.0f} {r['ttft_p99_ms']:>8.0f}"
            if "ttft_p50_ms" in r
            else f"{'':>12} {'':>8}"
        )
        print(
            f"{r['stack']:<22} {r['clients']:>7} {r['requests_per_s']:>8.2f} {r['tokens_per_s']:>10.1f} "
            f"{ttft} {scale:>10}"
        )


if __name__ == "__main__":
    main()
