"""Each sampling filter equals the transformers logits processor of the same name, and their order too."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from fasttune.infer.sampling import (
    SamplingParams,
    apply_min_p,
    apply_repetition_penalty,
    apply_top_k,
    apply_top_p,
    pick_next,
    process_logits,
)

V = 131


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, V, generator=g) * 3
    x[1, :5] = x[1, 5]  # ties, which top-k must keep together
    return x


@pytest.fixture
def seen():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, V, (4, 9), generator=g)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_matches_transformers(logits, seen, penalty):
    ref = RepetitionPenaltyLogitsProcessor(penalty)(seen, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), ref, rtol=0, atol=0)


def test_repetition_penalty_ignores_padding(logits, seen):
    mask = torch.ones_like(seen, dtype=torch.bool)
    mask[:, :3] = False  # left padding: these ids must not count
    expected = RepetitionPenaltyLogitsProcessor(1.5)(seen[:, 3:], logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.5, mask), expected, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_matches_transformers(logits, k):
    ref = TopKLogitsWarper(k)(None, logits.clone())
    assert torch.equal(apply_top_k(logits, k), ref)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9, 0.999])
def test_top_p_matches_transformers(logits, p):
    ref = TopPLogitsWarper(p)(None, logits.clone())
    assert torch.equal(apply_top_p(logits, p), ref)


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_transformers(logits, p):
    ref = MinPLogitsWarper(p)(None, logits.clone())
    assert torch.equal(apply_min_p(logits, p), ref)
    assert bool((apply_min_p(logits, p) > float("-inf")).sum(-1).ge(1).all())


def test_all_filters_in_transformers_order(logits, seen):
    params = SamplingParams(do_sample=True, temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.2,
                            min_p=0.05)
    ref = LogitsProcessorList([
        RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.7), TopKLogitsWarper(20),
        TopPLogitsWarper(0.8), MinPLogitsWarper(0.05),
    ])(seen, logits.clone())
    torch.testing.assert_close(process_logits(logits, params, seen), ref, rtol=0, atol=0)


def test_greedy_ignores_temperature_but_keeps_the_penalty(logits, seen):
    params = SamplingParams(do_sample=False, temperature=0.1, top_k=1, repetition_penalty=1.2)
    out = process_logits(logits, params, seen)
    torch.testing.assert_close(out, apply_repetition_penalty(logits, seen, 1.2))
    assert torch.equal(pick_next(out, params), out.argmax(-1))


def test_sampling_draws_only_kept_tokens_and_follows_the_seed(logits):
    params = SamplingParams(do_sample=True, top_k=3)
    kept = process_logits(logits, params)
    draws = torch.stack([pick_next(kept, params, torch.Generator().manual_seed(s)) for s in range(50)])
    allowed = torch.topk(logits, 3).indices  # (4, 3)
    assert all(bool((allowed[b] == draws[:, b, None]).any(-1).all()) for b in range(4))
    again = pick_next(kept, params, torch.Generator().manual_seed(7))
    assert torch.equal(again, draws[7])


@pytest.mark.parametrize("bad, field", [
    (dict(do_sample=True, temperature=0.0), "temperature"), (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"), (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(min_p=1.5), "min_p")])
def test_bad_settings_name_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**bad)
