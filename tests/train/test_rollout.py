"""GRPO's rollout stream on a tiny random Llama: groups of sampled completions laid out for the loss, the
same sample for the same position (resume), and num_iterations replaying a window with the sampling
policy's log-probabilities."""

from __future__ import annotations

import torch
from pref_twins import smollm2_tokenizer, twins

from fasttune.data.pairs import PromptExample
from fasttune.models.base import IGNORE_INDEX
from fasttune.train.logps import token_logps
from fasttune.train.rollout import RolloutStream

ROWS = [{"prompt": "What is 2 + 2?", "answer": "4"}, {"prompt": "What is 3 + 5?", "answer": "8"},
        {"prompt": "What is 1 + 6?", "answer": "7"}, {"prompt": "What is 2 + 7?", "answer": "9"}]


def _stream(model, tok, **kw):
    prompts = [PromptExample(tok(r["prompt"], add_special_tokens=False)["input_ids"], r, i + 1)
               for i, r in enumerate(ROWS)]
    lengths = lambda completions, **_: [float(len(c)) for c in completions]  # noqa: E731
    return RolloutStream(model, tok, prompts, [lengths], reward_weights=None, batch_size=4, num_generations=2,
                         max_completion_length=5, temperature=1.0, top_p=1.0, pad_id=tok.pad_token_id,
                         eos_ids=[tok.eos_token_id], max_seq_length=64, seed=3, **kw)


def test_groups_layout_and_resumable_sampling():
    tok = smollm2_tokenizer()
    model, _ = twins(len(tok))
    stream = _stream(model, tok)
    batch = next(stream)
    assert batch["input_ids"].shape[0] == 4 and stream.state_dict() == {"epoch": 0, "index": 1}
    scored = batch["targets"] != IGNORE_INDEX
    lengths = scored.sum(dim=1)
    assert ((lengths >= 1) & (lengths <= 5)).all()
    last = [int(batch["targets"][r][scored[r]][-1]) for r in range(4)]
    assert batch["truncated"].tolist() == [t != tok.eos_token_id for t in last]  # cut short: no EOS
    assert all(n == 5 for n, cut in zip(lengths.tolist(), batch["truncated"].tolist()) if cut)
    # the reward is the text length: every completion scored, advantages zero-mean within each group
    assert batch["rewards"].shape == (4, 1) and torch.equal(batch["reward_total"], batch["rewards"][:, 0])
    torch.testing.assert_close(batch["advantages"].view(2, 2).sum(dim=1), torch.zeros(2), atol=1e-5, rtol=0)
    # the same position samples the same completions (the draw is seeded by seed, epoch and index)
    again = _stream(model, tok)
    again.load_state_dict({"epoch": 0, "index": 0})
    assert torch.equal(next(again)["input_ids"], batch["input_ids"])


def test_num_iterations_replays_the_window_with_the_sampling_log_probs():
    tok = smollm2_tokenizer()
    model, _ = twins(len(tok))
    stream = _stream(model, tok, num_iterations=2, accumulation=1)
    first, replay, fresh = next(stream), next(stream), next(stream)
    assert replay is first and fresh is not first
    assert stream.state_dict() == {"epoch": 1, "index": 0}  # both micro-batches of the epoch sampled
    keys = ("input_ids", "targets", "position_ids", "attention_mask")
    with torch.no_grad():
        now = token_logps(model, {k: first[k] for k in keys})
    torch.testing.assert_close(first["old_logps"], now, rtol=0, atol=1e-6)  # the policy has not moved
