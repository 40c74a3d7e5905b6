"""Start serving: load a run (or a base model), build the scheduler and the app, run uvicorn.

Weights come through `infer/load.py` (safetensors or GGUF only; pickle files are never loaded). The served
model's id, the `model` field every request must name, is the run directory's name, else the model name.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fasttune.serve.protocol import ModelInfo
from fasttune.serve.scheduler import Scheduler

log = logging.getLogger("fasttune.serve")


@dataclass
class ServeOptions:
    """How to serve; the CLI's flags."""

    host: str = "127.0.0.1"
    port: int = 8000
    slots: int = 8  # requests decoded together
    context: int | None = None  # prompt + answer tokens per request (None: min(model's limit, 2048))
    max_queue: int = 64  # requests waiting for a free slot before the server answers 429
    compile: str = "auto"  # auto | eager | cuda_graph
    api_key: str | None = None
    max_body: int = 1 << 20
    runs_root: str | None = "runs"


DEFAULT_CONTEXT = 2048


def model_id(run: str | None, model: str | None, adapter: str | None) -> str:
    """The name clients put in `model`: the run directory's (or adapter's) name, else the model name."""
    if run is not None:
        p = Path(run).resolve()
        return p.parent.name if p.name == "adapter" else p.name
    if adapter is not None:
        return Path(adapter).resolve().name
    if model is not None and Path(model).exists():
        return Path(model).resolve().name  # a local directory or .gguf file: its name
    return model or "smollm2-135m"


def resolve_context(requested: int | None, model: Any) -> int:
    """The cache columns per request: what was asked, within the model's own position limit."""
    limit = getattr(model.config, "max_position_embeddings", None)
    if requested is None:
        return min(limit or DEFAULT_CONTEXT, DEFAULT_CONTEXT)
    if requested < 2:
        raise ValueError(f"--context {requested}: must be at least 2")
    if limit is not None and requested > limit:
        raise ValueError(f"--context {requested}: the model's limit is {limit} positions")
    return requested


def build(im: Any, mid: str, opts: ServeOptions) -> tuple[Any, Scheduler]:
    """(ASGI app, started scheduler) for a loaded `infer.load.InferenceModel`."""
    from fasttune.serve.app import build_app

    context = resolve_context(opts.context, im.model)
    scheduler = Scheduler(
        im.model, slots=opts.slots, max_len=context, max_queue=opts.max_queue, compile=opts.compile
    ).start()
    info = ModelInfo(mid, im.tokenizer, im.contract, im.eos_token_ids, context)
    app = build_app(scheduler, info, api_key=opts.api_key, max_body=opts.max_body, runs_root=opts.runs_root)
    return app, scheduler


def serve_forever(app: Any, scheduler: Scheduler | None, opts: ServeOptions) -> None:
    """Run uvicorn until interrupted, then stop the scheduler (None: the page alone, `fasttune ui`)."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if scheduler is not None:
        log.info("serving %d slots x %d tokens (%s decode step) on http://%s:%d", scheduler.slots,
                 scheduler.max_len, scheduler.mode, opts.host, opts.port)
    else:
        log.info("showing the runs under %s on http://%s:%d", opts.runs_root, opts.host, opts.port)
    try:
        # access_log off: the app's gate writes the one line per request (with tokens and timing)
        uvicorn.run(app, host=opts.host, port=opts.port, access_log=False, log_level="warning")
    finally:
        if scheduler is not None:
            scheduler.shutdown()
