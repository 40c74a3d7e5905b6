"""Many concurrent OpenAI clients in a process of their own, for the load tests.

python load_clients.py URL MODEL REQUESTS.json -> prints one JSON object: {"answers": [...], "errors": [...]}
where REQUESTS.json is a list of {"question", "max_tokens", "stream"}; every request runs in its own thread,
all started together.
"""

from __future__ import annotations

import json
import sys
import threading

import openai


def ask(client: openai.OpenAI, model: str, req: dict) -> str:
    kw = dict(
        model=model,
        messages=[{"role": "user", "content": req["question"]}],
        max_tokens=req["max_tokens"],
        temperature=0,
    )
    if not req["stream"]:
        return client.chat.completions.create(**kw).choices[0].message.content
    return "".join(
        c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
    )


def main(url: str, model: str, path: str) -> None:
    requests = json.loads(open(path).read())
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    answers: list[str | None] = [None] * len(requests)
    errors: list[str] = []
    start = threading.Barrier(len(requests))

    def run(i: int) -> None:
        start.wait()
        try:
            answers[i] = ask(client, model, requests[i])
        except Exception as e:  # reported to the test, which fails on any
            errors.append(f"request {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"answers": answers, "errors": errors}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
