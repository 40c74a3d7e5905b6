"""Long documents for continued pretraining (`on_long_row: chunk`): a text row longer than max_seq_length
becomes several examples instead of being cut or dropped.

Consecutive chunks overlap by one token, so that every token after the first is predicted exactly once: a
chunk's first token only feeds the prediction of its second (position 0 predicts nothing), and it is the
token the previous chunk predicted last. A worked example, max_seq_length 4 and tokens a b c d e f g:
```
chunk 1  a b c d      predicts b c d
chunk 2  d e f g      predicts e f g
```
"""

from __future__ import annotations

from fasttune.data.tokenize import Example


def chunk_example(example: Example, max_len: int) -> list[Example]:
    """`example` as chunks of at most max_len tokens with stride max_len - 1 (module docstring)."""
    if max_len < 2:
        raise ValueError("chunking needs max_seq_length of at least 2")
    ids, labels = example.input_ids, example.labels
    if len(ids) <= max_len:
        return [example]
    out = []
    for start in range(0, len(ids) - 1, max_len - 1):
        out.append(Example(ids[start:start + max_len], labels[start:start + max_len], example.row))
        if start + max_len >= len(ids):
            break
    return out
