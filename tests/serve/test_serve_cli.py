"""`fasttune serve`: wrong options are one line and exit status 2 before anything loads; a real server
process answers the openai client and logs one line per request."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from serve_helpers import free_port

from fasttune.cli import main


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--slots", "0"], "--slots 0: must be at least 1"),
        (["--port", "70000"], "--port 70000: must be between"),
        (["--max_queue", "-1"], "--max_queue -1: must be at least 0"),
        (["--runs_root", "/no/such/dir"], "--runs_root /no/such/dir: no such directory"),
        (["--context", "1"], "--context 1: must be at least 2"),
    ],
)
def test_wrong_option_is_one_line_and_status_2(argv, message, capsys):
    assert main(["serve", "smollm2-135m", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fasttune: error: ") and message in err and err.count("\n") == 1


def test_a_port_in_use_is_named(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "smollm2-135m", "--port", str(port)]) == 2
    assert f"--port {port}: cannot listen there" in capsys.readouterr().err


def test_context_past_the_model_limit_is_named(tiny_model_dir, capsys):
    assert main(["serve", str(tiny_model_dir), "--context", "100000", "--port", str(free_port())]) == 2
    assert "--context 100000: the model's limit is 256 positions" in capsys.readouterr().err


@pytest.mark.slow
def test_served_process_answers_and_logs_one_line_per_request(tiny_model_dir, tmp_path):
    import openai

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2] / "src"), "FASTTUNE_API_KEY": "k3y"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "fasttune",
            "serve",
            str(tiny_model_dir),
            "--port",
            str(port),
            "--context",
            "64",
            "--slots",
            "2",
            "--runs_root",
            str(tmp_path),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k3y", max_retries=0)
        deadline = time.monotonic() + 120
        while True:
            try:
                models = client.models.list()
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert [m.id for m in models.data] == [tiny_model_dir.name]
        r = client.chat.completions.create(
            model=tiny_model_dir.name,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            temperature=0,
        )
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    lines = [line for line in err.splitlines() if " /v1/" in line]
    assert len(lines) == 2, err
    assert "GET /v1/models 200" in lines[0]
    assert "POST /v1/chat/completions 200" in lines[1] and "prompt=" in lines[1] and "finish=" in lines[1]


def test_pickled_weights_are_never_loaded(tiny_model_dir, tmp_path, capsys):
    """A model directory whose weights are a pickle file (pytorch_model.bin) is refused, not unpickled."""
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    for f in pickled.glob("*.safetensors"):
        f.unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    assert main(["serve", str(pickled), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert "no .safetensors weights (pytorch_model.bin are pickle files, which are never loaded)" in err


def test_ui_serves_the_page_and_the_runs_without_a_model(tmp_path):
    from serve_helpers import AppServer

    from fasttune.serve.app import build_app

    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "run.yaml").write_text("model:\n  model_name: smollm2-135m\n")
    with AppServer(build_app(None, None, runs_root=tmp_path)) as live:
        status, page = live.request("GET", "/")
        assert status == 200 and "<title>fasttune</title>" in page
        status, runs = live.request("GET", "/api/runs")
        assert status == 200 and [r["name"] for r in runs["runs"]] == ["one"]
        assert runs["runs"][0]["state"] == "stopped" and runs["runs"][0]["model"] == "smollm2-135m"
        status, body = live.request("POST", "/v1/chat/completions", {"model": "x", "messages": []})
        assert status == 404 and body["error"]["code"] == "model_not_found"
        status, body = live.request("POST", "/api/runs/one/export", {"kind": "gguf"})
        assert status == 409 and body["error"]["code"] == "run_not_finished"
        status, body = live.request("GET", "/api/runs/..%2F..%2Fetc")
        assert status == 404 and "error" in body
