"""Evaluation: the loss is the cross-entropy of the trained tokens, and answers are compared exactly and
after normalisation."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from infer_models import real_vocab_model

from fasttune.data.templates import make_contract
from fasttune.data.tokenize import encode_row
from fasttune.infer.evaluate import evaluate, greedy_answers, normalize_answer

ROWS = [
    {"instruction": "Who built the first tide-harp?", "input": "", "output": "Idra Vaskelund."},
    {"instruction": "Summarise.", "input": "The harp has seven strings.", "output": "Seven strings."},
    {"instruction": "How many pedals?", "input": "", "output": "Three pedals, all brass."},
]


def test_normalisation():
    assert normalize_answer("  The L-7 Harp!\n") == normalize_answer("the l7 harp") == "the l7 harp"
    assert normalize_answer("Don't stop, ever.") == "dont stop ever"
    assert normalize_answer("a b") != normalize_answer("ab")


def test_loss_is_the_cross_entropy_of_trained_tokens(smollm2_tokenizer):
    model = real_vocab_model()
    contract = make_contract("alpaca", "alpaca", smollm2_tokenizer)
    result = evaluate(model, smollm2_tokenizer, ROWS, contract, batch_size=2, answers=False)
    total, n = 0.0, 0
    for row in ROWS:  # one row at a time, full logits: the definition
        ex = encode_row(row, "alpaca", smollm2_tokenizer, contract)
        ids, labels = torch.tensor([ex.input_ids]), torch.tensor(ex.labels)
        with torch.no_grad():
            logits = model(ids).logits[0, :-1].float()
        total += float(F.cross_entropy(logits, labels[1:], ignore_index=-100, reduction="sum"))
        n += int((labels[1:] != -100).sum())
    assert result["eval_tokens"] == n and result["n_rows"] == 3
    assert math.isclose(result["eval_loss"], total / n, rel_tol=1e-5)
    assert math.isclose(result["perplexity"], math.exp(total / n), rel_tol=1e-5)
    assert "exact_match" not in result


def test_answers_match_exactly_or_after_normalisation(smollm2_tokenizer):
    model = real_vocab_model()
    contract = make_contract("alpaca", "alpaca", smollm2_tokenizer)
    from fasttune.data.templates import render_prompt

    prompts = [render_prompt(r["instruction"], r["input"], contract, smollm2_tokenizer) for r in ROWS]
    own = greedy_answers(model, smollm2_tokenizer, prompts, contract, eos_token_ids=[], max_new_tokens=6)
    # batched answers equal answers one at a time (left padding does not leak)
    assert own == [
        greedy_answers(model, smollm2_tokenizer, [p], contract, eos_token_ids=[], max_new_tokens=6)[0]
        for p in prompts
    ]
    rows = [
        dict(ROWS[0], output=own[0]),  # exact
        dict(ROWS[1], output="  " + own[1].upper() + "!! "),  # same after normalisation
        dict(ROWS[2], output="something else entirely"),
    ]  # different
    result = evaluate(model, smollm2_tokenizer, rows, contract, eos_token_ids=[], max_new_tokens=6)
    assert normalize_answer(own[1]) != normalize_answer(own[2])
    assert result["n_answered"] == 3
    assert math.isclose(result["exact_match"], 1 / 3) and math.isclose(result["normalized_match"], 2 / 3)
    assert result["samples"][0] == {"question": ROWS[0]["instruction"], "reference": own[0], "answer": own[0]}


def test_answer_set_keeps_the_questions_and_caps_new_tokens(smollm2_tokenizer):
    from fasttune.infer.evaluate import ANSWER_MARGIN, answer_set

    contract = make_contract("alpaca", "alpaca", smollm2_tokenizer)
    chat = {"messages": [{"role": "user", "content": "Which metal are the pedals?"},
                         {"role": "assistant", "content": "Brass, polished by hand every spring."}]}
    rows = [ROWS[0], {"text": "a text row asks nothing"}, chat, ROWS[2]]
    asked = answer_set(rows, contract, smollm2_tokenizer)
    assert asked.questions == [ROWS[0]["instruction"], "Which metal are the pedals?", ROWS[2]["instruction"]]
    assert asked.references == [ROWS[0]["output"], chat["messages"][1]["content"], ROWS[2]["output"]]
    longest = max(len(smollm2_tokenizer.encode(r, add_special_tokens=False)) for r in asked.references)
    assert asked.max_new_tokens == longest + ANSWER_MARGIN
    assert answer_set([{"text": "nothing to ask"}], contract, smollm2_tokenizer) is None


def test_match_answers_scores_the_first_limit_questions(smollm2_tokenizer):
    import pytest

    from fasttune.data.templates import render_prompt
    from fasttune.infer.evaluate import answer_set, match_answers

    model = real_vocab_model()
    contract = make_contract("alpaca", "alpaca", smollm2_tokenizer)
    prompts = [render_prompt(r["instruction"], r["input"], contract, smollm2_tokenizer) for r in ROWS]
    own = greedy_answers(model, smollm2_tokenizer, prompts, contract, eos_token_ids=[], max_new_tokens=5)
    # the model's own answers as references, the third one wrong: a perfect score on the first two
    rows = [dict(ROWS[0], output=own[0]), dict(ROWS[1], output=own[1] + "!"), dict(ROWS[2], output="no")]
    asked = answer_set(rows, contract, smollm2_tokenizer)
    two = match_answers(model, smollm2_tokenizer, asked, contract, eos_token_ids=[], limit=2,
                        max_new_tokens=5)
    assert two["n_answered"] == 2 and two["exact_match"] == 0.5 and two["normalized_match"] == 1.0
    assert [s["answer"] for s in two["samples"]] == own[:2]
    every = match_answers(model, smollm2_tokenizer, asked, contract, eos_token_ids=[], max_new_tokens=5)
    assert every["n_answered"] == 3 and math.isclose(every["normalized_match"], 2 / 3)
    with pytest.raises(ValueError, match="limit"):
        match_answers(model, smollm2_tokenizer, asked, contract, eos_token_ids=[], limit=0)
