"""`fasttune data preview`: trained tokens marked, summary shown."""

from __future__ import annotations

from fasttune.config import DataConfig
from fasttune.data.preview import preview_rows
from fasttune.data.tokenize import build_dataset


def test_plain_preview_marks_exactly_the_trained_spans(smol_tok, write_jsonl):
    rows = [{"messages": [{"role": "user", "content": "안녕?"}, {"role": "assistant", "content": "네 😀"},
                          {"role": "user", "content": "more"}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}]
    td = build_dataset(DataConfig(dataset=str(write_jsonl(rows))), smol_tok, 256)
    text = preview_rows(td.examples, smol_tok, n=1, color=False, summary=td.summary)
    assert "showing 1 of 2 examples" in text and "── row 1:" in text and "row 2" not in text
    assert "assistant\n«네 😀<|im_end|>»\n<|im_start|>user\nmore<|im_end|>" in text
    body = text.split("\n", 1)[1]  # after the legend, which names the markers
    assert body.count("«") == 2 and "«ok<|im_end|>»" in body
    assert "\033[" not in text
    assert str(td.summary) in text and "rows read 2" in text


def test_color_preview_uses_ansi_green(plain_tok, write_jsonl):
    path = write_jsonl([{"instruction": "q", "output": "a"}])
    td = build_dataset(DataConfig(dataset=str(path)), plain_tok, 128)
    text = preview_rows(td.examples, plain_tok, n=3, color=True)
    assert "### Response:\n\033[32ma<|im_end|>\033[0m" in text and "«" not in text
