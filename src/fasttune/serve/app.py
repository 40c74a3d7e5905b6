"""The ASGI app: OpenAI routes over the scheduler, the runs API and the web page, behind one gate.

Routes: POST /v1/chat/completions, POST /v1/completions (JSON, or server-sent events with "stream": true),
GET /v1/models, GET /health; the page at / with its API under /api (`serve/runs_api.py`). Every refusal is
an OpenAI-style error body with a 4xx status; a body over `max_body` bytes is a 413 before it is read whole.
The gate (`Gate`) checks the API key, when one is set, on /v1 and /api, and logs one line per request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fasttune.serve.answers import Answer
from fasttune.serve.protocol import (
    APIError,
    Generation,
    ModelInfo,
    parse_body,
    parse_chat,
    parse_completion,
    read_body,
)
from fasttune.serve.scheduler import Scheduler

log = logging.getLogger("fasttune.serve")
STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_BODY = 1 << 20  # 1 MiB: far more than any prompt the context holds


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _watch_disconnect(request: Request, answer: Answer) -> None:
    """Cancel the answer when the client goes away (the body is read, so the next message is the end)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            answer.cancel()
            return


class OpenAIRoutes:
    """The handlers of the OpenAI routes for one served model."""

    def __init__(self, scheduler: Scheduler, info: ModelInfo, max_body: int) -> None:
        self.scheduler, self.info, self.max_body = scheduler, info, max_body
        self.created = int(time.time())

    async def health(self, request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": self.info.id, **self.scheduler.load()})

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        if request.path_params["model"] != self.info.id:
            raise APIError(
                404,
                f"the model '{request.path_params['model']}' does not exist; this server "
                f"serves '{self.info.id}'",
                param="model",
                code="model_not_found",
            )
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.info.id,
            "object": "model",
            "created": self.created,
            "owned_by": "fasttune",
            "context_length": self.info.context,
        }

    async def chat(self, request: Request) -> Response:
        gen = parse_chat(parse_body(await read_body(request, self.max_body)), self.info)
        return await self._answer(request, gen, chat=True)

    async def completions(self, request: Request) -> Response:
        gen = parse_completion(parse_body(await read_body(request, self.max_body)), self.info)
        return await self._answer(request, gen, chat=False)

    async def _answer(self, request: Request, gen: Generation, chat: bool) -> Response:
        answer = Answer(self.scheduler, gen, self.info.tokenizer, self.info.eos_ids)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        request.state.answer = answer
        if gen.stream:
            return StreamingResponse(
                self._events(request, answer, rid, chat),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache"},
            )
        watcher = asyncio.create_task(_watch_disconnect(request, answer))
        try:
            text = await answer.read_all()
        finally:
            watcher.cancel()
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": answer.finish_reason,
            }
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": answer.finish_reason}
        return JSONResponse(
            {
                "id": rid,
                "object": "chat.completion" if chat else "text_completion",
                "created": int(time.time()),
                "model": self.info.id,
                "choices": [choice],
                "usage": answer.usage,
            }
        )

    async def _events(self, request: Request, answer: Answer, rid: str, chat: bool) -> AsyncIterator[str]:
        """Server-sent events: OpenAI's chunks, then `data: [DONE]`."""
        created = int(time.time())
        kind = "chat.completion.chunk" if chat else "text_completion"

        def chunk(piece: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta = (
                    {"role": "assistant", "content": ""}
                    if first
                    else {}
                    if piece is None
                    else {"content": piece}
                )
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": piece or "", "logprobs": None, "finish_reason": finish}
            body = {"id": rid, "object": kind, "created": created, "model": self.info.id, "choices": [choice]}
            if answer.gen.include_usage:
                body["usage"] = None
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        watcher = asyncio.create_task(_watch_disconnect(request, answer))
        try:
            if chat:
                yield chunk(None, None, first=True)
            try:
                async for piece in answer.pieces():
                    yield chunk(piece, None)
            except APIError as e:
                yield f"data: {json.dumps(e.body())}\n\n"
                return
            yield chunk(None, answer.finish_reason)
            if answer.gen.include_usage:
                usage = {
                    "id": rid,
                    "object": kind,
                    "created": created,
                    "model": self.info.id,
                    "choices": [],
                    "usage": answer.usage,
                }
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            watcher.cancel()
            answer.cancel()


class Gate:
    """ASGI middleware: the API key on /v1 and /api (constant-time comparison), one log line per request."""

    PROTECTED = ("/v1/", "/api/")

    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), [0]

        async def send_status(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if (
                self.expected is not None
                and scope["path"].startswith(self.PROTECTED)
                and not self._authorized(scope)
            ):
                e = APIError(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer KEY'",
                    type="authentication_error",
                    code="invalid_api_key",
                )
                await error_response(e)(scope, receive, send_status)
                return
            await self.app(scope, receive, send_status)
        finally:
            self._log(scope, status[0], time.perf_counter() - start)

    def _authorized(self, scope: dict) -> bool:
        given = b""
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                given = value
        return hmac.compare_digest(given, self.expected)

    @staticmethod
    def _log(scope: dict, status: int, seconds: float) -> None:
        client = scope.get("client") or ("-", 0)
        line = f"{client[0]} {scope['method']} {scope['path']} {status} {seconds * 1000:.0f}ms"
        answer = (scope.get("state") or {}).get("answer")
        if answer is not None:
            u = answer.usage
            line += (
                f" prompt={u['prompt_tokens']} completion={u['completion_tokens']} "
                f"finish={answer.finish_reason or 'cancelled'}"
            )
            if answer.first_token_at is not None:
                line += f" ttft={1000 * (answer.first_token_at - answer.started):.0f}ms"
        log.info(line)


def _no_model(request: Request) -> Response:
    raise APIError(404, "no model is served here (fasttune ui shows the runs only); start `fasttune serve "
                        "RUN_DIR` to chat with one", code="model_not_found")


def _api_error(request: Request, exc: Exception) -> Response:
    return error_response(exc)  # type: ignore[arg-type]


def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    return error_response(APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))


def _server_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(APIError(500, f"internal error: {type(exc).__name__}", type="server_error"))


def build_app(
    scheduler: Scheduler | None,
    info: ModelInfo | None,
    *,
    api_key: str | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    runs_root: str | Path | None = None,
) -> Any:
    """The ASGI application: OpenAI routes for `info` served by `scheduler`, the page, the runs API.

    Without a scheduler (`fasttune ui`) it serves the page and the runs API only; /v1 answers 404.
    """
    table = []
    if scheduler is not None and info is not None:
        routes = OpenAIRoutes(scheduler, info, max_body)
        table += [
            Route("/health", routes.health, methods=["GET"]),
            Route("/v1/models", routes.models, methods=["GET"]),
            Route("/v1/models/{model:path}", routes.model, methods=["GET"]),
            Route("/v1/chat/completions", routes.chat, methods=["POST"]),
            Route("/v1/completions", routes.completions, methods=["POST"]),
        ]
    else:
        table += [
            Route("/health", lambda request: JSONResponse({"status": "ok", "model": None}), methods=["GET"]),
            Route("/v1/{rest:path}", _no_model, methods=["GET", "POST"]),
        ]
    if runs_root is not None:
        from fasttune.serve.runs_api import RunsAPI

        table += RunsAPI(Path(runs_root)).routes()
    table += [
        Route("/", lambda request: FileResponse(STATIC / "index.html"), methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    app = Starlette(
        routes=table,
        exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _server_error},
    )
    return Gate(app, api_key)
