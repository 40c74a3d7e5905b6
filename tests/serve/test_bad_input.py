"""Bad input over raw HTTP: always a 4xx with an OpenAI-style error body naming the field, never a 500, and
the server answers correctly afterwards. Also: the queue's 429, the body limit, a client that disconnects
mid-stream, the API key."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
from serve_helpers import MODEL_ID, LiveServer

from fasttune.serve.scheduler import wait_idle

CHAT = "/v1/chat/completions"
OK = {"model": MODEL_ID, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}


def _with(**fields):
    body = dict(OK)
    for k, v in fields.items():
        if v is _DROP:
            body.pop(k)
        else:
            body[k] = v
    return body


_DROP = object()

CASES = [  # (name, path, body, status, param)
    ("invalid json", CHAT, '{"model": "tiny", "messages": [', 400, None),
    ("not utf-8", CHAT, b'{"model": "\xff\xfe"}', 400, None),
    ("not an object", CHAT, "[1, 2]", 400, None),
    (
        "NaN",
        CHAT,
        '{"model": "tiny", "messages": [{"role": "user", "content": "a"}], "temperature": NaN}',
        400,
        None,
    ),
    ("missing messages", CHAT, _with(messages=_DROP), 400, "messages"),
    ("missing model", CHAT, _with(model=_DROP), 400, "model"),
    ("messages not a list", CHAT, _with(messages="hi"), 400, "messages"),
    (
        "content not a string",
        CHAT,
        _with(messages=[{"role": "user", "content": 5}]),
        400,
        "messages[0].content",
    ),
    ("unknown role", CHAT, _with(messages=[{"role": "tool", "content": "x"}]), 400, "messages[0].role"),
    (
        "last turn not the user's",
        CHAT,
        _with(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]),
        400,
        "messages[1].role",
    ),
    ("temperature a string", CHAT, _with(temperature="hot"), 400, "temperature"),
    ("temperature too high", CHAT, _with(temperature=3), 400, "temperature"),
    ("top_p zero", CHAT, _with(top_p=0), 400, "top_p"),
    ("max_tokens a boolean", CHAT, _with(max_tokens=True), 400, "max_tokens"),
    ("max_tokens zero", CHAT, _with(max_tokens=0), 400, "max_tokens"),
    ("max_tokens past the context", CHAT, _with(max_tokens=10_000), 400, "max_tokens"),
    (
        "prompt longer than the context",
        CHAT,
        _with(messages=[{"role": "user", "content": "word " * 400}]),
        400,
        "messages",
    ),
    ("n=2", CHAT, _with(n=2), 400, "n"),
    ("penalty", CHAT, _with(presence_penalty=0.5), 400, "presence_penalty"),
    ("unsupported field", CHAT, _with(tools=[]), 400, "tools"),
    ("five stops", CHAT, _with(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("seed a float", CHAT, _with(seed=1.5), 400, "seed"),
    ("stream a string", CHAT, _with(stream="yes"), 400, "stream"),
    (
        "stream_options without stream",
        CHAT,
        _with(stream_options={"include_usage": True}),
        400,
        "stream_options",
    ),
    ("unknown model", CHAT, _with(model="gpt-4"), 404, "model"),
    ("completion without prompt", "/v1/completions", {"model": MODEL_ID}, 400, "prompt"),
    (
        "completion with two prompts",
        "/v1/completions",
        {"model": MODEL_ID, "prompt": ["a", "b"]},
        400,
        "prompt",
    ),
    (
        "completion ids outside the vocabulary",
        "/v1/completions",
        {"model": MODEL_ID, "prompt": [1, 10**9]},
        400,
        "prompt",
    ),
    ("echo", "/v1/completions", {"model": MODEL_ID, "prompt": "a", "echo": True}, 400, "echo"),
]


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_bad_request_is_a_4xx_naming_the_field(server, name, path, body, status, param):
    got, answer = server.request("POST", path, body)
    assert got == status, answer
    err = answer["error"]
    assert isinstance(err["message"], str) and err["message"] and err["type"]
    assert err["param"] == param


def test_wrong_method_and_unknown_path_are_openai_errors_and_the_server_lives_on(server):
    status, body = server.request("GET", CHAT)
    assert status == 405 and "error" in body
    status, body = server.request("POST", "/v1/nothing", OK)
    assert status == 404 and "error" in body
    status, body = server.request("POST", CHAT, OK)
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"


def test_body_over_the_limit_is_413_declared_or_chunked(tiny, tokenizer, contract):
    with LiveServer(tiny, tokenizer, contract, slots=1, context=64, max_queue=1, max_body=2000) as live:
        big = _with(messages=[{"role": "user", "content": "x" * 5000}])
        status, body = live.request("POST", CHAT, big)
        assert status == 413 and body["error"]["code"] == "request_too_large"
        # no Content-Length: the body arrives in chunks and is cut off once it passes the limit
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=30)
        conn.request(
            "POST",
            CHAT,
            body=iter([json.dumps(big).encode()[i : i + 1000] for i in range(0, 6000, 1000)]),
            headers={"Content-Type": "application/json"},
            encode_chunked=True,
        )
        resp = conn.getresponse()
        assert resp.status == 413 and "error" in json.loads(resp.read())
        conn.close()
        assert live.request("POST", CHAT, OK)[0] == 200


def test_full_queue_answers_429_and_the_waiting_requests_complete(tiny, tokenizer, contract):
    # The scheduler starts only after the third request, so exactly one row and one queue place exist.
    with LiveServer(
        tiny, tokenizer, contract, slots=1, context=64, max_queue=1, start_scheduler=False
    ) as live:
        results = []
        waiting = [
            threading.Thread(target=lambda: results.append(live.request("POST", CHAT, OK))) for _ in range(2)
        ]
        for t in waiting:
            t.start()
        deadline = time.monotonic() + 10
        while live.scheduler.load()["waiting"] < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, body = live.request("POST", CHAT, OK)
        assert status == 429 and body["error"]["type"] == "rate_limit_error"
        live.scheduler.start()
        for t in waiting:
            t.join(timeout=30)
        assert [s for s, _ in results] == [200, 200]


def test_client_disconnect_mid_stream_frees_its_slot(server):
    cancelled = server.scheduler.cancelled
    body = json.dumps(_with(max_tokens=120, stream=True, messages=[{"role": "user", "content": "Go on"}]))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(
            (
                f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n{body}"
            ).encode()
        )
        received = b""
        while b"data: " not in received:  # the stream has started
            received += sock.recv(4096)
            assert received.startswith(b"HTTP/1.1 200"), received
    assert wait_idle(server.scheduler)
    assert server.scheduler.cancelled == cancelled + 1
    assert server.request("POST", CHAT, OK)[0] == 200


def test_api_key_is_required_on_the_api_but_not_for_health(tiny, tokenizer, contract):
    import openai

    with LiveServer(tiny, tokenizer, contract, slots=1, context=64, max_queue=1, api_key="s3cret") as live:
        assert live.request("POST", CHAT, OK)[0] == 401
        status, body = live.request("POST", CHAT, OK, headers={"Authorization": "Bearer wrong"})
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        assert live.request("GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert live.request("GET", "/health")[0] == 200
        with pytest.raises(openai.AuthenticationError):
            live.client(api_key="wrong").models.list()
        r = live.client(api_key="s3cret").chat.completions.create(**OK)
        assert r.choices[0].finish_reason in ("stop", "length")
