"""on_long_row chunk: a long text row becomes consecutive examples that train every token exactly once,
the same tokens a model with a longer context would train on; other row formats refuse it by name."""

from __future__ import annotations

import pytest

from fasttune.config import DataConfig
from fasttune.data.chunking import chunk_example
from fasttune.data.errors import DataError
from fasttune.data.tokenize import IGNORE_INDEX, Example, build_dataset


def _predicted(examples):
    """Every trained target token, in order (position 0 of an example predicts nothing)."""
    out = []
    for ex in examples:
        for t in range(1, len(ex.input_ids)):
            if ex.labels[t] != IGNORE_INDEX:
                out.append(ex.input_ids[t])
    return out


@pytest.mark.parametrize("n,max_len", [(7, 4), (10, 4), (4, 4), (5, 2), (100, 17)])
def test_every_token_after_the_first_is_predicted_once(n, max_len):
    ex = Example(list(range(100, 100 + n)), list(range(100, 100 + n)), row=3)
    chunks = chunk_example(ex, max_len)
    assert all(len(c.input_ids) <= max_len and c.row == 3 for c in chunks)
    assert _predicted(chunks) == ex.input_ids[1:]
    if n == 7 and max_len == 4:  # the module docstring's example
        assert [c.input_ids for c in chunks] == [[100, 101, 102, 103], [103, 104, 105, 106]]


def test_long_text_rows_are_chunked_not_cut(write_jsonl, smol_tok):
    text = " ".join(f"word{i}" for i in range(300))
    path = write_jsonl([{"text": text}, {"text": "short one"}])
    whole = build_dataset(DataConfig(dataset=str(path)), smol_tok, 100_000, "train")
    chunked = build_dataset(DataConfig(dataset=str(path), on_long_row="chunk"), smol_tok, 64, "train")
    assert chunked.summary.chunked == 1 and chunked.summary.truncated == 0
    assert "split into chunks 1" in str(chunked.summary)
    assert max(len(e.input_ids) for e in chunked.examples) <= 64
    assert chunked.summary.trained_tokens == whole.summary.trained_tokens  # nothing lost
    assert _predicted(chunked.examples) == _predicted(whole.examples)


def test_rows_with_a_response_refuse_chunking(write_jsonl, smol_tok):
    path = write_jsonl([{"instruction": "a", "output": "b"}])
    with pytest.raises(DataError, match="on_long_row chunk: splits text rows .* use truncate or drop"):
        build_dataset(DataConfig(dataset=str(path), on_long_row="chunk"), smol_tok, 64, "train")
