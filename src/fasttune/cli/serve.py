"""`fasttune serve`: an OpenAI-compatible server for a run (or a base model) and the runs web page;
`fasttune ui`: the page alone, with no model loaded.

The options are checked before anything loads; a wrong one is one line naming it and exit status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from pathlib import Path

from fasttune.cli.parser import add_command
from fasttune.config import ConfigError

API_KEY_ENV = "FASTTUNE_API_KEY"


def register(subs: argparse._SubParsersAction) -> None:
    p = add_command(
        subs, "serve", "serve a run over an OpenAI-compatible HTTP API, with the runs web page",
        "Serve RUN (a run or adapter directory) or MODEL (a base model) at /v1/chat/completions and\n"
        "/v1/completions (streaming or not), /v1/models and /health; concurrent requests share forward\n"
        "passes (continuous batching). The page at / shows the runs under --runs_root, a chat playground\n"
        "and export. Examples:\n"
        "  fasttune serve runs/default\n"
        "  fasttune serve smollm2-135m --port 8080 --api_key s3cret", cmd_serve)
    p.add_argument("target", nargs="?", default=None, metavar="RUN_DIR | MODEL",
                   help="A run directory (runs/x), an adapter directory, or a base model name or directory "
                        "(default: smollm2-135m)")
    p.add_argument("--adapter", metavar="DIR", default=None,
                   help="LoRA adapter directory (PEFT format) on top of MODEL (default: none)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="Weights precision (default: auto: bf16 on GPUs that have it, fp32 on CPU)")
    p.add_argument("--cpu_fallback_16bit", action="store_true",
                   help="Load a 4-bit run in 16/32-bit on a machine without CUDA (default: off)")
    g = _add_listen_flags(p)
    g.add_argument("--slots", type=int, default=8, metavar="N",
                   help="Requests decoded together in one batch (default: 8)")
    g.add_argument("--context", type=int, default=None, metavar="N",
                   help="Prompt + answer tokens of one request (default: the model's limit, at most 2048)")
    g.add_argument("--max_queue", type=int, default=64, metavar="N",
                   help="Requests that may wait for a free slot; one more is answered 429 (default: 64)")
    g.add_argument("--max_body", type=int, default=1 << 20, metavar="BYTES",
                   help="Largest request body; a larger one is answered 413 (default: 1048576)")
    g.add_argument("--compile", default="auto", choices=("auto", "eager", "cuda_graph"),
                   help="Decoding step: 'auto' (a CUDA graph for a 16-bit model on a GPU, else eager), "
                        "'eager' or 'cuda_graph' (default: auto)")
    g.add_argument("--runs_root", default=None, metavar="DIR",
                   help="The page lists the runs in this directory (default: the served run's parent "
                        "directory, else ./runs)")

    ui = add_command(
        subs, "ui", "the runs web page alone (no model loaded)",
        "Serve the page of `fasttune serve` without a model: the runs under --runs_root with their curves,\n"
        "answers and exports. Its chat tab needs `fasttune serve`. Example: fasttune ui --runs_root runs",
        cmd_ui)
    g = _add_listen_flags(ui)
    g.add_argument("--runs_root", default="runs", metavar="DIR",
                   help="The page lists the runs in this directory (default: runs)")


def _add_listen_flags(p: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="Address to listen on; 0.0.0.0 opens it to the network (default: 127.0.0.1)")
    g.add_argument("--port", type=int, default=8000, help="TCP port (default: 8000)")
    g.add_argument("--api_key", default=None,
                   help=f"Require 'Authorization: Bearer KEY' on /v1 and /api (default: ${API_KEY_ENV}, "
                        "else none)")
    return g


def _check(args: argparse.Namespace) -> None:
    for name, low in (("slots", 1), ("max_queue", 0), ("max_body", 1)):
        if getattr(args, name, low) < low:
            raise ConfigError(f"--{name} {getattr(args, name)}: must be at least {low}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: must be between 1 and 65535")
    if getattr(args, "context", None) is not None and args.context < 2:
        raise ConfigError(f"--context {args.context}: must be at least 2")
    if args.runs_root is not None and not Path(args.runs_root).is_dir():
        raise ConfigError(f"--runs_root {args.runs_root}: no such directory")
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family) as s:
            s.bind((args.host, args.port))
    except OSError as e:
        where = f"--host {args.host} --port {args.port}"
        raise ConfigError(f"{where}: cannot listen there ({e.strerror})") from None


def _open_to_network(host: str) -> bool:
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def cmd_serve(args: argparse.Namespace) -> int:
    from fasttune.infer.load import load_for_inference
    from fasttune.run_dir import holds_adapter
    from fasttune.serve.server import ServeOptions, build, model_id, serve_forever

    _check(args)
    is_run = args.target is not None and holds_adapter(args.target)
    if is_run and args.adapter is not None:
        raise ConfigError(f"--adapter: {args.target} is a run directory, which has its adapter already")
    run, model = (args.target, None) if is_run else (None, args.target)
    runs_root = args.runs_root
    if runs_root is None:
        runs_root = str(Path(run).resolve().parent) if run is not None else "runs"
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    try:
        im = load_for_inference(model, adapter=args.adapter, run=run, device=args.device, dtype=args.dtype,
                                cpu_fallback_16bit=args.cpu_fallback_16bit)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"cannot load {args.target or 'smollm2-135m'}: {e}") from e
    print(f"loaded {im.description}", file=sys.stderr)
    for note in im.notes:
        print(f"  note: {note}", file=sys.stderr)
    opts = ServeOptions(host=args.host, port=args.port, slots=args.slots, context=args.context,
                        max_queue=args.max_queue, compile=args.compile, api_key=api_key,
                        max_body=args.max_body, runs_root=runs_root)
    try:
        app, scheduler = build(im, model_id(run, model, args.adapter), opts)
    except ValueError as e:
        raise ConfigError(f"serve: {e}") from e
    if _open_to_network(args.host) and api_key is None:
        print(f"warning: listening on {args.host} without --api_key: anyone who can reach it can use it",
              file=sys.stderr)
    serve_forever(app, scheduler, opts)
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from fasttune.serve.app import build_app
    from fasttune.serve.server import ServeOptions, serve_forever

    _check(args)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    opts = ServeOptions(host=args.host, port=args.port, api_key=api_key, runs_root=args.runs_root)
    if _open_to_network(args.host) and api_key is None:
        print(f"warning: listening on {args.host} without --api_key: anyone who can reach it can use it",
              file=sys.stderr)
    serve_forever(build_app(None, None, api_key=api_key, runs_root=args.runs_root), None, opts)
    return 0
