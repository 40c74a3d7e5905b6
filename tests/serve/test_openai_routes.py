"""The OpenAI routes driven by the real `openai` client: answers equal `fasttune generate`'s, token for token,
for every client of a concurrent batch, streaming and not."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_helpers import MODEL_ID, alpaca_ids, reference

QUESTIONS = [
    "Who invented the tide-harp?",
    "How do I tune the lowest string?",
    "What is a drone?",
    "Hi",
    "Name three colours.",
    "Why is the sky blue?",
    "Count to five.",
    "What is 2 + 2?",
]


def _expected(server, question: str, max_tokens: int) -> str:
    ids = alpaca_ids(server.tokenizer, server.contract, question)
    text, _ = reference(
        server.model,
        server.tokenizer,
        ids,
        max_new_tokens=max_tokens,
        eos_ids=server.eos_ids,
        stops=list(server.contract.stop_strings),
    )
    return text


def _chat(client, question: str, max_tokens: int, stream: bool) -> tuple[str, str]:
    kw = dict(
        model=MODEL_ID, messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0
    )
    if not stream:
        r = client.chat.completions.create(**kw)
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = "", None
    for chunk in client.chat.completions.create(stream=True, **kw):
        delta = chunk.choices[0].delta.content
        text += delta or ""
        finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.mark.parametrize("stream", [False, True])
def test_concurrent_greedy_chat_equals_generate_for_every_client(server, stream):
    client = server.client()
    expected = {q: _expected(server, q, 24) for q in QUESTIONS}
    steps = server.scheduler.steps
    with ThreadPoolExecutor(len(QUESTIONS)) as pool:  # 8 clients on 4 slots: some wait, rows are reused
        got = dict(zip(QUESTIONS, pool.map(lambda q: _chat(client, q, 24, stream), QUESTIONS)))
    for q in QUESTIONS:
        assert got[q][0] == expected[q], q
        assert got[q][1] in ("stop", "length")
    # Shared forwards: far fewer steps than 8 answers decoded one after another.
    assert server.scheduler.steps - steps < 8 * 23


def test_completion_streaming_and_not_equal_the_raw_prompt_generation(server):
    client = server.client()
    prompt = "Once upon a time"
    ids = list(server.tokenizer(prompt)["input_ids"])
    text, _ = reference(
        server.model, server.tokenizer, ids, max_new_tokens=20, eos_ids=server.eos_ids, stops=None
    )
    r = client.completions.create(model=MODEL_ID, prompt=prompt, max_tokens=20, temperature=0)
    assert r.choices[0].text == text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens <= 20
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=MODEL_ID, prompt=prompt, max_tokens=20, temperature=0, stream=True
        )
    )
    assert streamed == text


def test_user_stop_string_ends_the_answer_before_it(server):
    client = server.client()
    full = client.completions.create(model=MODEL_ID, prompt="The list:", max_tokens=30, temperature=0)
    text = full.choices[0].text
    assert len(text) > 4
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    cut = client.completions.create(
        model=MODEL_ID, prompt="The list:", max_tokens=30, temperature=0, stop=stop
    )
    assert cut.choices[0].text == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_seeded_sampling_is_reproducible_and_matches_generate(server):
    client = server.client()
    question = "Tell me a story."
    ids = alpaca_ids(server.tokenizer, server.contract, question)
    expected, _ = reference(
        server.model,
        server.tokenizer,
        ids,
        max_new_tokens=16,
        eos_ids=server.eos_ids,
        stops=list(server.contract.stop_strings),
        do_sample=True,
        temperature=0.8,
        top_p=0.9,
        seed=7,
    )
    kw = dict(
        model=MODEL_ID,
        messages=[{"role": "user", "content": question}],
        max_tokens=16,
        temperature=0.8,
        top_p=0.9,
        seed=7,
    )
    answers = [client.chat.completions.create(**kw).choices[0].message.content for _ in range(2)]
    assert answers == [expected, expected]


def test_usage_chunk_when_asked_and_models_list(server):
    client = server.client()
    chunks = list(
        client.chat.completions.create(
            model=MODEL_ID,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert [m.id for m in client.models.list().data] == [MODEL_ID]
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["slots"] == 4
