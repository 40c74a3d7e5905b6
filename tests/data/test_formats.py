"""Format detection, validation and normalisation; every error names file, row and field."""

from __future__ import annotations

import pytest

from fasttune.config import DataConfig
from fasttune.data.errors import DataError
from fasttune.data.formats import load_rows, normalise_row

GOOD = {"instruction": "Say hi", "input": "", "output": "Hi!"}


def test_detects_each_format(write_jsonl):
    cases = {
        "alpaca": [GOOD],
        "messages": [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
        "text": [{"text": "Once upon a time"}],
    }
    for fmt, rows in cases.items():
        valid = load_rows(str(write_jsonl(rows, f"{fmt}.jsonl")), DataConfig())
        assert valid.format == fmt and len(valid.rows) == 1


def test_sharegpt_is_normalised_to_role_content(write_jsonl):
    row = {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": "hi"},
                             {"from": "gpt", "value": "hello"}]}
    valid = load_rows(str(write_jsonl([row])), DataConfig())
    assert valid.format == "messages"
    assert valid.rows == [(1, {"messages": [{"role": "system", "content": "Be kind."},
                                            {"role": "user", "content": "hi"},
                                            {"role": "assistant", "content": "hello"}]})]


def test_openai_text_parts_are_joined():
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    row = {"messages": [{"role": "user", "content": parts}, {"role": "assistant", "content": "c"}]}
    assert normalise_row(row, "messages", DataConfig())["messages"][0] == {"role": "user", "content": "ab"}


def test_column_mapping_and_optional_input(write_jsonl):
    cfg = DataConfig(instruction_field="question", output_field="answer", input_field="context")
    path = write_jsonl([{"question": "Q?", "answer": "A."},
                        {"question": "Q2", "context": "C", "answer": "A2"}])
    valid = load_rows(str(path), cfg)
    assert valid.format == "alpaca"
    assert [r for _, r in valid.rows] == [{"instruction": "Q?", "input": "", "output": "A."},
                                          {"instruction": "Q2", "input": "C", "output": "A2"}]


def test_unknown_keys_name_the_row(write_jsonl):
    path = write_jsonl([{"question": "x", "answer": "y"}])
    with pytest.raises(DataError, match=r"data\.jsonl, row 1: cannot tell the format from the keys "
                                        r"\['answer', 'question'\]"):
        load_rows(str(path), DataConfig())
    # Skipping bad rows does not hide a format that matches nothing.
    with pytest.raises(DataError, match="cannot tell the format"):
        load_rows(str(path), DataConfig(on_bad_row="skip"))


BAD_ROWS = [
    ({"instruction": "x"}, "output", "missing", "missing field"),
    ({"instruction": "x", "output": 3}, "output", "expected a string, found int 3", "wrong type"),
    ({"instruction": "x", "output": ["a"]}, "output", "expected a string, found list", "wrong type"),
    ({"instruction": "x", "output": "  "}, "output", "empty string", "empty output"),
    ({"instruction": "", "output": "y"}, "instruction", "empty string", "empty instruction"),
    ({"instruction": "x", "input": 5, "output": "y"}, "input", "expected a string", "wrong type"),
]


@pytest.mark.parametrize("row,field,message,reason", BAD_ROWS)
def test_alpaca_errors_name_file_row_field(write_jsonl, row, field, message, reason):
    path = write_jsonl([GOOD, GOOD, row])
    with pytest.raises(DataError) as err:
        load_rows(str(path), DataConfig(format="alpaca"))
    assert str(err.value).startswith(f"{path}, row 3, field '{field}': {message}")
    assert (err.value.row, err.value.field, err.value.reason) == (3, field, reason)


def _chat(*turns):
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


BAD_CHATS = [
    (_chat(("user", "a")), "messages", "no assistant turn", "no assistant turn"),
    (_chat(("user", "a"), ("robot", "b")), "messages[1].role", "unknown role 'robot'", "unknown role"),
    (_chat(("user", "a"), ("assistant", "")), "messages[1].content", "empty string", "empty assistant turn"),
    (_chat(("user", "a"), ("assistant", 7)), "messages[1].content", "expected a string, found int",
     "wrong type"),
    ({"messages": "hello"}, "messages", "expected a list of messages", "wrong type"),
    ({"messages": [{"content": "x"}]}, "messages[0]", "missing 'role'", "missing field"),
    ({"conversations": [{"from": "human", "value": "a"}, {"from": "bot", "value": "b"}]},
     "conversations[1].from", "unknown role 'bot'", "unknown role"),
]


@pytest.mark.parametrize("row,field,message,reason", BAD_CHATS)
def test_messages_errors_name_file_row_field(write_jsonl, row, field, message, reason):
    path = write_jsonl([_chat(("user", "a"), ("assistant", "b")), row])
    with pytest.raises(DataError) as err:
        load_rows(str(path), DataConfig())
    assert str(err.value).startswith(f"{path}, row 2, field '{field}': {message}")
    assert err.value.reason == reason


def test_completion_errors(write_jsonl):
    path = write_jsonl([{"text": "ok"}, {"text": ""}])
    with pytest.raises(DataError, match=r"row 2, field 'text': empty string"):
        load_rows(str(path), DataConfig())


def test_skip_counts_by_reason_and_keeps_row_numbers(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join([
        '{"instruction": "a", "output": "b"}',
        "{broken",
        '{"instruction": "a", "output": 1}',
        '{"instruction": "a", "output": ""}',
        '{"instruction": "a", "output": "c"}',
        '{"instruction": "a"}',
        '{"instruction": "a", "output": []}',
    ]))
    valid = load_rows(str(path), DataConfig(on_bad_row="skip"))
    assert [n for n, _ in valid.rows] == [1, 5]
    assert valid.read == 7
    assert dict(valid.skipped) == {"not JSON": 1, "wrong type": 2, "empty output": 1, "missing field": 1}
    with pytest.raises(DataError, match="row 2: not valid JSON"):
        load_rows(str(path), DataConfig())


def test_format_detected_from_first_readable_row_when_skipping(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('nonsense\n{"text": "hello"}\n')
    valid = load_rows(str(path), DataConfig(on_bad_row="skip"))
    assert valid.format == "text" and valid.rows == [(2, {"text": "hello"})]


def test_max_rows_counts_valid_rows(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": ""}\n{"text": "a"}\n{"text": "b"}\n{"text": "c"}\n')
    valid = load_rows(str(path), DataConfig(on_bad_row="skip", max_rows=2))
    assert [r["text"] for _, r in valid.rows] == ["a", "b"] and valid.read == 3


def test_a_text_column_beside_alpaca_columns(write_jsonl):
    """Rows that carry Alpaca columns and the text a notebook built from them: --format text, or a
    text_field named away from the default, trains the text; the default reads them as Alpaca rows."""
    row = dict(GOOD, text="### 질문: Say hi\n### 답: Hi!", body="Q: Say hi A: Hi!")
    path = str(write_jsonl([row]))
    assert load_rows(path, DataConfig()).format == "alpaca"
    explicit = load_rows(path, DataConfig(format="text"))
    assert explicit.format == "text" and explicit.rows == [(1, {"text": row["text"]})]
    named = load_rows(path, DataConfig(text_field="body"))
    assert named.format == "text" and named.rows == [(1, {"text": row["body"]})]


def test_explicit_format_validates_against_it(write_jsonl):
    path = write_jsonl([{"text": "hello"}])
    with pytest.raises(DataError, match=r"row 1, field 'instruction': missing"):
        load_rows(str(path), DataConfig(format="alpaca"))


def test_csv_missing_cell_is_a_missing_field(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("instruction,input,output\nq,,a\nq2\n")
    with pytest.raises(DataError, match=r"d\.csv, row 3, field 'output': missing"):
        load_rows(str(path), DataConfig())
