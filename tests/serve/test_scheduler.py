"""Continuous batching: every request's tokens equal `generate`'s for the same prompt alone, whoever shares
the batch, however rows are joined, left and reused; cancelled requests leave; the queue is bounded."""

from __future__ import annotations

import threading

import pytest
import torch
from infer_models import make_model

from fasttune.infer.generate import generate
from fasttune.infer.sampling import SamplingParams
from fasttune.serve.scheduler import Job, QueueFull, Scheduler, wait_idle

PROMPTS = [[1, 2, 3], [5, 6], [7, 8, 9, 10, 11, 12], [3], [40, 41, 42, 43], [9, 9, 9], [17, 1], [2] * 9]


class Collector:
    """The emit callback of several jobs: tokens per job, and how each ended."""

    def __init__(self, n: int) -> None:
        self.tokens = [[] for _ in range(n)]
        self.ends: dict[int, tuple[str, object]] = {}
        self.done = threading.Event()
        self.n = n

    def emit_for(self, i: int):
        def emit(kind, value):
            if kind == "token":
                self.tokens[i].append(value)
            else:
                self.ends[i] = (kind, value)
                if len(self.ends) == self.n:
                    self.done.set()

        return emit


def alone(model, prompt, n, **sampling) -> list[int]:
    out = generate(
        model, torch.tensor([prompt]), max_new_tokens=n, eos_token_ids=[], compile=False, **sampling
    )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize(
    "config", [{}, {"model_type": "mistral", "sliding_window": 4}], ids=["llama", "window"]
)
def test_every_request_gets_the_tokens_it_gets_alone(config):
    model = make_model(**config)
    # Greedy and sampled requests (each with its own seed and settings) share rows; 8 requests on 3 rows.
    settings = [
        dict(do_sample=True, temperature=0.7, top_p=0.9, seed=11) if i % 3 == 1 else {}
        for i in range(len(PROMPTS))
    ]
    lengths = [5 + 3 * i for i in range(len(PROMPTS))]
    expected = [alone(model, p, n, **s) for p, n, s in zip(PROMPTS, lengths, settings)]
    scheduler = Scheduler(model, slots=3, max_len=48, max_queue=16, compile="eager").start()
    got = Collector(len(PROMPTS))
    try:
        for i, (p, n, s) in enumerate(zip(PROMPTS, lengths, settings)):
            seed = s.pop("seed", None)
            job = Job(p, n, SamplingParams(**s), [], got.emit_for(i), seed=seed)
            scheduler.submit(job)
        assert got.done.wait(60)
    finally:
        scheduler.shutdown()
    assert got.tokens == expected
    assert all(end == ("end", "length") for end in got.ends.values())
    assert scheduler.steps < sum(lengths) - len(PROMPTS)  # forwards were shared


def test_eos_ends_a_request_and_its_row_serves_the_next():
    model = make_model()
    first = alone(model, PROMPTS[0], 6)
    eos = first[2]  # the third token ends the first request
    expected = first[: first.index(eos) + 1]
    scheduler = Scheduler(model, slots=1, max_len=32, max_queue=4, compile="eager").start()
    got = Collector(2)
    try:
        scheduler.submit(Job(PROMPTS[0], 6, SamplingParams(), [eos], got.emit_for(0)))
        scheduler.submit(Job(PROMPTS[1], 4, SamplingParams(), [], got.emit_for(1)))
        assert got.done.wait(30)
    finally:
        scheduler.shutdown()
    assert got.tokens[0] == expected and got.ends[0] == ("end", "stop")
    assert got.tokens[1] == alone(model, PROMPTS[1], 4)


def test_cancelled_request_leaves_and_the_queue_is_bounded():
    model = make_model()
    scheduler = Scheduler(model, slots=1, max_len=40, max_queue=1, compile="eager")
    got = Collector(2)
    long = Job(PROMPTS[0], 30, SamplingParams(), [], got.emit_for(0))
    short = Job(PROMPTS[1], 3, SamplingParams(), [], got.emit_for(1))
    scheduler.submit(long)
    scheduler.submit(short)  # the one free row holds one more while the scheduler has not started
    with pytest.raises(QueueFull):
        scheduler.submit(Job(PROMPTS[2], 3, SamplingParams(), [], lambda *a: None))
    with pytest.raises(ValueError, match="context"):
        scheduler.submit(Job(PROMPTS[2], 40, SamplingParams(), [], lambda *a: None))
    long.cancel()
    scheduler.start()
    try:
        assert got.done.wait(30) and wait_idle(scheduler)
    finally:
        scheduler.shutdown()
    assert got.ends[0] == ("end", "cancelled") and len(got.tokens[0]) < 30
    assert got.tokens[1] == alone(model, PROMPTS[1], 3)
    assert scheduler.cancelled == 1


def test_only_our_model_is_served():
    with pytest.raises(ValueError, match="Llama-family"):
        Scheduler(torch.nn.Linear(2, 2), slots=1, max_len=8, max_queue=1)


@pytest.mark.gpu
def test_cuda_graph_step_gives_each_request_its_tokens_alone():
    """On the GPU: the step captured once as a CUDA graph (fused q/k/v and gate/up products, one cache
    column per row) serves rows that join and leave, each with the tokens `generate` gives it alone."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    model = make_model().to("cuda")  # fp32: bf16 rounding differs between batch shapes
    lengths = [5 + 3 * i for i in range(len(PROMPTS))]
    expected = [alone(model, p, n) for p, n in zip(PROMPTS, lengths)]
    scheduler = Scheduler(model, slots=3, max_len=48, max_queue=16, compile="cuda_graph").start()
    assert scheduler.mode == "cuda_graph" and scheduler.decoder.fused
    got = Collector(len(PROMPTS))
    try:
        for i, (p, n) in enumerate(zip(PROMPTS, lengths)):
            scheduler.submit(Job(p, n, SamplingParams(), [], got.emit_for(i)))
        assert got.done.wait(120)
    finally:
        scheduler.shutdown()
    assert got.tokens == expected
