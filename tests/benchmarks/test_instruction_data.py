"""The benchmark's instruction dataset: the same rows from the same seed, Alpaca columns, and lengths that
follow the target distribution (about 50 to 1,500 tokens, most of them short) in a given tokenizer."""

import statistics

import instruction_data as data


def test_same_seed_same_rows_and_another_seed_other_rows():
    assert data.make_rows(40, seed=3) == data.make_rows(40, seed=3)
    assert data.make_rows(40, seed=3) != data.make_rows(40, seed=4)


def test_lengths_are_uneven_like_instruction_data():
    lengths = data.target_lengths(2000, seed=0)
    assert min(lengths) == 50 and max(lengths) == 1500
    assert 200 <= statistics.median(lengths) <= 300
    assert sum(n > 1000 for n in lengths) >= 20 and sum(n < 100 for n in lengths) >= 100


def test_rows_are_sized_in_the_tokenizers_tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    rows = data.make_rows(60, seed=1, tokenizer=tok)
    assert all(set(r) == {"instruction", "input", "output"} and r["output"] for r in rows)
    assert any(r["input"] for r in rows) and not all(r["input"] for r in rows)
    sized = [len(tok(data.row_text(r), add_special_tokens=False)["input_ids"]) for r in rows]
    assert all(abs(n - t) <= 5 for n, t in zip(sized, data.target_lengths(60, seed=1))), sized
