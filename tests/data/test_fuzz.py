"""A property-based fuzzer over every data format and source (SFT rows, and the TRL rows of the preference
and RL methods): malformed JSON, wrong types, missing and extra columns, empty strings, huge rows, invalid
UTF-8, mixed formats, duplicate rows and broken quoting.

Whatever the input, loading either raises DataError naming the file (and the row, and the field where a
field is at fault) or, with on_bad_row=skip, returns rows and skip counts that add up to the rows read, and
loses no row without reporting it. Never another exception. The examples are derandomized and bounded, so
the suite is reproducible and fast.
"""

from __future__ import annotations

import csv
import io
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fasttune.config import DataConfig
from fasttune.data.errors import DataError
from fasttune.data.formats import load_rows

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
ODD = st.sampled_from([5, 2.5, True, None, [1], {"a": 1}, ["x", "y"]])


def good_row(fmt: str, draw) -> dict:
    if fmt == "alpaca":
        return {"instruction": draw(TEXT), "input": draw(TEXT), "output": draw(TEXT)}
    if fmt == "messages":
        return {"messages": [{"role": "user", "content": draw(TEXT)},
                             {"role": draw(st.sampled_from(["assistant", "assistant", "bot"])),
                              "content": draw(TEXT)}]}
    return {"text": draw(TEXT)}


@st.composite
def datasets(draw, columnar: bool):
    """(rows, format): rows of one format, each possibly broken in one way."""
    fmt = draw(st.sampled_from(["alpaca", "messages", "text"]))
    rows: list[dict] = []
    for _ in range(draw(st.integers(1, 8))):
        row = good_row(fmt, draw)
        how = draw(st.sampled_from(["ok", "ok", "missing", "empty", "wrong_type", "extra", "huge",
                                    "other_format", "duplicate"]))
        key = draw(st.sampled_from(sorted(row)))
        if how == "missing":
            del row[key]
        elif how == "empty":
            row[key] = ""
        elif how == "wrong_type" and not columnar:
            row[key] = draw(ODD)
        elif how == "extra":
            row["zzz_extra"] = draw(TEXT)
        elif how == "huge":
            row[key] = "x" * 20000 if key != "messages" else [{"role": "user", "content": "y" * 20000}]
        elif how == "other_format":
            row = good_row(draw(st.sampled_from(["alpaca", "messages", "text"])), draw)
        elif how == "duplicate" and rows:
            row = json.loads(json.dumps(rows[-1]))
        rows.append(row)
    return rows, fmt


def corrupt(data: bytes, draw) -> bytes:
    """Byte-level damage to a text file: a torn line, invalid UTF-8, a stray quote, or none."""
    lines = data.split(b"\n")
    i = draw(st.integers(0, max(len(lines) - 1, 0)))
    how = draw(st.sampled_from(["none", "none", "tear", "utf8", "quote"]))
    if how == "tear" and lines[i]:
        lines[i] = lines[i][: max(1, len(lines[i]) // 2)]
    elif how == "utf8":
        lines[i] = lines[i] + b"\xff\xfe"
    elif how == "quote":
        lines[i] = b'"' + lines[i]
    return b"\n".join(lines)


def write(kind: str, rows: list[dict], path, draw):
    if kind == "jsonl":
        data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
        path = path / "d.jsonl"
        path.write_bytes(corrupt(data, draw))
    elif kind == "json":
        path = path / "d.json"
        path.write_bytes(corrupt(json.dumps(rows, ensure_ascii=False, indent=1).encode(), draw))
    elif kind == "csv":
        columns = sorted({k for r in rows for k in r})
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(columns)
        for r in rows:
            writer.writerow([json.dumps(r[c]) if isinstance(r.get(c), list | dict) else r.get(c, "")
                             for c in columns])
        path = path / "d.csv"
        path.write_bytes(corrupt(buf.getvalue().encode(), draw))
    else:
        import pyarrow as pa

        if not any(rows):  # a table without columns stores no rows at all
            rows = [{**r, "zzz_extra": "x"} for r in rows]
        names = sorted({k for r in rows for k in r})  # every row's columns (a missing value is null)
        try:
            table = pa.table({k: [r.get(k) for r in rows] for k in names})
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            # mixed types in one column cannot be stored columnar at all: store the values as JSON text
            table = pa.table({k: [json.dumps(r[k]) if k in r else None for r in rows] for k in names})
        if kind == "parquet":
            import pyarrow.parquet as pq

            path = path / "d.parquet"
            pq.write_table(table, path)
        else:
            import datasets

            path = path / "saved"
            datasets.Dataset(table).save_to_disk(str(path))
    return path


def check(path, fmt_option: str, written: int) -> None:
    """The properties every input must keep; `written` rows went into the file."""
    for on_bad_row in ("error", "skip"):
        cfg = DataConfig(dataset=str(path), format=fmt_option, on_bad_row=on_bad_row)
        try:
            valid = load_rows(str(path), cfg)
        except DataError as e:
            assert e.file is not None and str(path) in str(e), str(e)
            if e.reason in ("missing field", "wrong type") or e.reason.startswith("empty"):
                assert e.row is not None and e.field is not None, str(e)
            if on_bad_row == "skip":
                # skip mode stops only for what cannot be skipped: the file, a CSV header, the first row's
                # format
                assert e.row is None or e.row == 1 or e.reason == "unknown format", str(e)
            continue
        assert valid.read == len(valid.rows) + sum(valid.skipped.values())
        # rows are never lost silently (e.g. swallowed by an unterminated quote): a shortfall is reported
        assert valid.read == written or valid.skipped, (valid.read, written)
        numbers = [n for n, _ in valid.rows]
        assert numbers == sorted(set(numbers))  # each row once, in file order
        if on_bad_row == "error":
            assert not valid.skipped


SETTINGS = settings(max_examples=25, derandomize=True, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "saved"])
@pytest.mark.parametrize("fmt_option", ["auto", "alpaca", "messages", "text"])
def test_every_source_and_format_errs_or_counts(kind, fmt_option, tmp_path_factory):
    @SETTINGS
    @given(st.data())
    def run(data):
        rows, _ = data.draw(datasets(columnar=kind in ("parquet", "saved")))
        path = write(kind, rows, tmp_path_factory.mktemp(kind), data.draw)
        check(path, fmt_option, len(rows))

    run()


# ---- the TRL formats of the preference and RL methods ------------------------------------------------

METHOD_COLUMNS = {"dpo": ("prompt", "chosen", "rejected"), "kto": ("prompt", "completion", "label"),
                  "grpo": ("prompt",)}


@st.composite
def method_rows(draw, method: str, columnar: bool):
    rows: list[dict] = []
    for _ in range(draw(st.integers(1, 6))):
        conversational = draw(st.booleans())
        if conversational:
            row = {"prompt": [{"role": "user", "content": draw(TEXT)}]}
            for key in METHOD_COLUMNS[method][1:]:
                row[key] = [{"role": "assistant", "content": draw(TEXT)}] if key != "label" else True
        else:
            row = {"prompt": draw(TEXT)}
            for key in METHOD_COLUMNS[method][1:]:
                row[key] = draw(TEXT) if key != "label" else draw(st.booleans())
        how = draw(st.sampled_from(["ok", "ok", "missing", "empty", "wrong_type", "extra", "mixed",
                                    "duplicate"]))
        key = draw(st.sampled_from(sorted(row)))
        if how == "missing":
            del row[key]
        elif how == "empty":
            row[key] = "" if key != "label" else None
        elif how == "wrong_type" and not columnar:
            row[key] = draw(ODD)
        elif how == "extra":
            row["zzz_extra"] = draw(TEXT)
        elif how == "mixed":  # a plain prompt with conversational completions, or the reverse
            row["prompt"] = draw(TEXT) if conversational else [{"role": "user", "content": draw(TEXT)}]
        elif how == "duplicate" and rows:
            row = json.loads(json.dumps(rows[-1]))
        rows.append(row)
    return rows


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "saved"])
@pytest.mark.parametrize("method", ["dpo", "kto", "grpo"])
def test_every_source_of_method_rows_errs_or_counts(kind, method, smol_tok, tmp_path_factory):
    from fasttune.data.pairs import build_method_data

    @SETTINGS
    @given(st.data())
    def run(data):
        rows = data.draw(method_rows(method, columnar=kind in ("parquet", "saved")))
        path = write(kind, rows, tmp_path_factory.mktemp(kind), data.draw)
        for on_bad_row in ("error", "skip"):
            cfg = DataConfig(dataset=str(path), on_bad_row=on_bad_row)
            try:
                made = build_method_data(cfg, method, smol_tok, 64)
            except DataError as e:
                assert str(path) in str(e), str(e)
                if e.reason in ("missing field", "wrong type") or e.reason.startswith("empty"):
                    assert e.row is not None and e.field is not None, str(e)
                continue
            s = made.summary
            assert s.examples <= s.rows_valid <= s.rows_read
            assert s.rows_read - s.rows_valid <= sum(s.skipped.values())
            assert s.rows_read == len(rows) or s.skipped, (s.rows_read, len(rows))
            if on_bad_row == "error":
                assert not s.skipped

    run()
