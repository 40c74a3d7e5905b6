"""Load: concurrent clients in another process, every answer complete and equal to `fasttune generate`'s,
none lost; and the embedded SmolLM2 serving 8 concurrent clients on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from serve_helpers import LiveServer, alpaca_ids, reference

CLIENTS = Path(__file__).parent / "load_clients.py"


def run_clients(url: str, model: str, requests: list[dict], tmp_path: Path) -> dict:
    path = tmp_path / "requests.json"
    path.write_text(json.dumps(requests))
    out = subprocess.run(
        [sys.executable, str(CLIENTS), url, model, str(path)],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.slow
def test_32_clients_from_another_process_get_complete_correct_answers(tiny, tokenizer, contract, tmp_path):
    requests = [
        {"question": f"Question number {i}: what comes next?", "max_tokens": 8 + i % 9, "stream": i % 2 == 0}
        for i in range(32)
    ]
    with LiveServer(tiny, tokenizer, contract, slots=8, context=96, max_queue=32, model_id="tiny") as live:
        expected = [
            reference(
                tiny,
                tokenizer,
                alpaca_ids(tokenizer, contract, r["question"]),
                max_new_tokens=r["max_tokens"],
                eos_ids=live.eos_ids,
                stops=list(contract.stop_strings),
            )[0]
            for r in requests
        ]
        result = run_clients(live.url, "tiny", requests, tmp_path)
        load = live.scheduler.load()
    assert result["errors"] == []
    assert result["answers"] == expected
    assert load["in_flight"] == 0


@pytest.mark.slow
def test_embedded_smollm2_serves_8_concurrent_clients_correctly(tmp_path):
    from fasttune.infer.load import load_for_inference

    im = load_for_inference("smollm2-135m", device="cpu")
    questions = [
        "What is the capital of France?",
        "Name a primary colour.",
        "What is 3 + 4?",
        "Say hello in Spanish.",
        "What do bees make?",
        "How many legs does a cat have?",
        "What colour is the sky?",
        "Name a planet.",
    ]
    requests = [{"question": q, "max_tokens": 10, "stream": i % 2 == 1} for i, q in enumerate(questions)]
    with LiveServer(
        im.model,
        im.tokenizer,
        None,
        slots=8,
        context=256,
        max_queue=8,
        model_id="smollm2-135m",
        eos_ids=im.eos_token_ids,
    ) as live:
        expected = []
        for q in questions:
            text = im.tokenizer.apply_chat_template(
                [{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True
            )
            ids = list(im.tokenizer(text, add_special_tokens=False)["input_ids"])
            expected.append(
                reference(
                    im.model, im.tokenizer, ids, max_new_tokens=10, eos_ids=im.eos_token_ids, stops=None
                )[0]
            )
        result = run_clients(live.url, "smollm2-135m", requests, tmp_path)
    assert result["errors"] == []
    assert result["answers"] == expected
    assert any("Paris" in a for a in result["answers"])  # a real model's answer, not noise
