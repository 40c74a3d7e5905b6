"""The embedded Lumen L-7 dataset as shipped in the installed package: format, splits, probes."""

from __future__ import annotations

import json
import re
from importlib.resources import files

import pytest

ASSETS = files("fasttune") / "assets"
KEYS = {"instruction", "input", "output"}


def _jsonl(name: str) -> list[dict]:
    text = (ASSETS / name).read_text(encoding="utf-8")
    rows = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        assert line.strip(), f"{name} line {line_no}: blank line"
        rows.append(json.loads(line))
    return rows


@pytest.fixture(scope="module")
def train() -> list[dict]:
    return _jsonl("lumen_train.jsonl")


@pytest.fixture(scope="module")
def evals() -> list[dict]:
    return _jsonl("lumen_eval.jsonl")


@pytest.fixture(scope="module")
def probes() -> list[dict]:
    return json.loads((ASSETS / "lumen_probe.json").read_text(encoding="utf-8"))


def _norm(s: str) -> str:
    # Paraphrase checks compare questions without case, punctuation or extra spaces.
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


@pytest.mark.parametrize("name", ["lumen_train.jsonl", "lumen_eval.jsonl"])
def test_rows_are_alpaca_with_nonempty_strings(name):
    for i, row in enumerate(_jsonl(name)):
        assert set(row) == KEYS, f"{name} row {i}: keys {sorted(row)}"
        assert all(isinstance(row[k], str) for k in KEYS), f"{name} row {i}: non-string field"
        assert row["instruction"].strip() and row["output"].strip(), f"{name} row {i}: empty field"
        assert row["output"] == row["output"].strip(), f"{name} row {i}: output has edge whitespace"


def test_split_sizes(train, evals, probes):
    assert len(train) >= 130
    assert len(evals) == 30
    assert len(probes) == 12


def test_no_duplicate_instructions(train, evals):
    for name, rows in (("train", train), ("eval", evals)):
        seen = [_norm(r["instruction"]) for r in rows]
        dupes = {s for s in seen if seen.count(s) > 1}
        assert not dupes, f"{name}: duplicate instructions {sorted(dupes)}"


def test_some_train_rows_use_input(train):
    share = sum(bool(r["input"]) for r in train) / len(train)
    assert 0.12 <= share <= 0.25, f"{share:.0%} of train rows have an input"


def test_outputs_are_short(train):
    words = [len(r["output"].split()) for r in train]
    assert max(words) <= 40, f"longest train output has {max(words)} words"
    assert sum(w < 30 for w in words) / len(words) >= 0.9


def test_eval_is_held_out_and_answers_are_taught(train, evals):
    train_questions = {_norm(r["instruction"]) for r in train}
    train_outputs = {r["output"] for r in train}
    for i, row in enumerate(evals):
        assert _norm(row["instruction"]) not in train_questions, f"eval row {i} is a train question"
        assert row["output"] in train_outputs, f"eval row {i}: answer is not taught in train"


def test_facts_are_asked_in_several_phrasings(train):
    # A fact taught once is memorised, not generalised; most answers must recur across phrasings.
    counts: dict[str, int] = {}
    for r in train:
        counts[r["output"]] = counts.get(r["output"], 0) + 1
    repeated = [o for o, n in counts.items() if n >= 2]
    assert len(repeated) >= 40, f"only {len(repeated)} answers are asked in 2+ phrasings"


def test_probes_are_held_out_and_keywords_taught(train, probes):
    train_questions = {_norm(r["instruction"]) for r in train}
    outputs = [r["output"].lower() for r in train]
    for i, probe in enumerate(probes):
        assert set(probe) == {"instruction", "input", "expect"}, f"probe {i}: keys {sorted(probe)}"
        assert probe["input"] == "" and probe["instruction"].strip(), f"probe {i}"
        assert _norm(probe["instruction"]) not in train_questions, f"probe {i} is a train question"
        assert 1 <= len(probe["expect"]) <= 2, f"probe {i}: expect needs 1-2 keywords"
        for kw in probe["expect"]:
            assert isinstance(kw, str) and kw.strip(), f"probe {i}: bad keyword {kw!r}"
            # The keyword must not be given away by the question itself.
            assert kw.lower() not in probe["instruction"].lower(), f"probe {i}: '{kw}' is in the question"
            taught = sum(kw.lower() in o for o in outputs)
            assert taught >= 3, f"probe {i}: '{kw}' appears in only {taught} train outputs"


def test_invented_facts_are_consistent(train, evals):
    # Numbers that identify the instrument must never contradict each other across rows
    # (corrections quote the wrong value only in their input, never in their output).
    text = " ".join(r["output"] for r in train + evals)
    assert "19 strings" in text and not re.search(r"\b(?!19\b)\d+ strings", text)
    assert "436 Hz" in text and "440" not in text
    assert "28 notches" in text and not re.search(r"\b(?!28\b)\d+ notches", text)
    assert "1887" in text and "11.4 kg" in text
