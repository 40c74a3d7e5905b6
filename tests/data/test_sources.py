"""Reading rows from every kind of source, with row numbers as the user sees them."""

from __future__ import annotations

import json

import pytest

from fasttune.data.errors import DataError
from fasttune.data.sources import read_rows

ROWS = [{"instruction": "Say hi", "input": "", "output": "Hi!"},
        {"instruction": "번역해", "input": "안녕 😀", "output": "Hello 😀"}]


def test_data_error_message_names_file_row_field():
    e = DataError("empty string", file="data.jsonl", row=17, field="output")
    assert str(e) == "data.jsonl, row 17, field 'output': empty string"
    assert isinstance(e, ValueError)
    assert str(DataError("x").at(file="f.csv", row=3)) == "f.csv, row 3: x"


def test_jsonl_rows_numbered_by_line_blank_lines_skipped(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text(json.dumps(ROWS[0]) + "\n\n" + json.dumps(ROWS[1], ensure_ascii=False) + "\n",
                 encoding="utf-8")
    assert list(read_rows(str(p))) == [(1, ROWS[0]), (3, ROWS[1])]


def test_jsonl_bad_lines_are_row_errors_not_crashes(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + json.dumps(ROWS[0]).encode() + b"\n"  # BOM on line 1 is fine
                  + b"{not json}\n"
                  + b'{"instruction": "\xff\xfe"}\n'
                  + b"[1, 2]\n"
                  + json.dumps(ROWS[1]).encode() + b"\n")
    got = list(read_rows(str(p)))
    assert [n for n, _ in got] == [1, 2, 3, 4, 5]
    assert got[0][1] == ROWS[0] and got[4][1] == ROWS[1]
    kinds = [(r.row, r.reason) for _, r in got[1:4]]
    assert kinds == [(2, "not JSON"), (3, "invalid UTF-8"), (4, "not an object")]
    assert str(got[1][1]).startswith(f"{p}, row 2: not valid JSON")


@pytest.mark.parametrize("wrap", [lambda r: r, lambda r: {"data": r}, lambda r: {"train": r}])
def test_json_list_and_wrapped_list(tmp_path, wrap):
    p = tmp_path / "d.json"
    p.write_text(json.dumps(wrap(ROWS), ensure_ascii=False, indent=2), encoding="utf-8")
    assert list(read_rows(str(p))) == [(1, ROWS[0]), (2, ROWS[1])]


def test_json_object_of_splits(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps({"train": ROWS, "test": ROWS[:1]}))
    assert [r for _, r in read_rows(str(p))] == ROWS
    assert [r for _, r in read_rows(str(p), split="eval")] == ROWS[:1]
    with pytest.raises(DataError, match="an object with a 'validation' or 'data' list"):
        list(read_rows(str(p), split="validation"))


def test_json_file_holding_json_lines_is_read_as_jsonl(tmp_path):
    p = tmp_path / "d.json"
    p.write_text("\n".join(json.dumps(r) for r in ROWS))
    assert [r for _, r in read_rows(str(p))] == ROWS


def test_json_invalid_names_file_and_line(tmp_path):
    p = tmp_path / "d.json"
    p.write_text('[\n  {"a": 1},\n  {"a": }\n]')
    with pytest.raises(DataError, match=r"d\.json: not valid JSON \(line 3"):
        list(read_rows(str(p)))
    p.write_text('{"rows_of_something": 3}')
    with pytest.raises(DataError, match="list of objects"):
        list(read_rows(str(p)))


def test_csv_rows_numbered_as_in_a_spreadsheet(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text('instruction,input,output\nSay hi,,Hi!\n"multi\nline",안녕 😀,"Hello, 😀"\nshort\n'
                 "a,b,c,d\n", encoding="utf-8")
    got = list(read_rows(str(p)))
    assert got[0] == (2, {"instruction": "Say hi", "input": "", "output": "Hi!"})
    assert got[1] == (3, {"instruction": "multi\nline", "input": "안녕 😀", "output": "Hello, 😀"})
    assert got[2] == (4, {"instruction": "short", "input": None, "output": None})  # missing, not empty
    assert isinstance(got[3][1], DataError) and got[3][0] == 5 and "4 cells" in str(got[3][1])


def test_tsv_and_csv_bad_utf8(tmp_path):
    p = tmp_path / "d.tsv"
    p.write_text("text\tx\nhello\t1\n")
    assert list(read_rows(str(p))) == [(2, {"text": "hello", "x": "1"})]
    p = tmp_path / "bad.csv"
    p.write_bytes(b"text\nok\n\xff\n")
    with pytest.raises(DataError, match=r"bad\.csv: not valid UTF-8 text \(line 3"):
        list(read_rows(str(p)))


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.Table.from_pylist(ROWS + [{"instruction": "x", "input": None, "output": "y"}]), p)
    got = list(read_rows(str(p)))
    assert got[:2] == [(1, ROWS[0]), (2, ROWS[1])]
    assert got[2] == (3, {"instruction": "x", "input": None, "output": "y"})
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match="broken.parquet: not a readable Parquet file"):
        list(read_rows(str(tmp_path / "broken.parquet")))


def test_saved_dataset_and_dataset_dict(tmp_path):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_list(ROWS)
    ds.save_to_disk(str(tmp_path / "one"))
    assert [r for _, r in read_rows(str(tmp_path / "one"))] == ROWS
    dd = datasets.DatasetDict({"train": ds, "validation": datasets.Dataset.from_list(ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert [r for _, r in read_rows(str(tmp_path / "dict"))] == ROWS
    assert [r for _, r in read_rows(str(tmp_path / "dict"), split="validation")] == ROWS[:1]
    assert [r for _, r in read_rows(str(tmp_path / "dict"), split="eval")] == ROWS[:1]
    with pytest.raises(DataError, match="no split 'test' \\(splits: train, validation\\)"):
        list(read_rows(str(tmp_path / "dict"), split="test"))
    (tmp_path / "plain").mkdir()
    with pytest.raises(DataError, match="plain: a dataset directory must be one saved with"):
        list(read_rows(str(tmp_path / "plain")))


def test_missing_file_and_unknown_extension(tmp_path):
    with pytest.raises(DataError, match="dataset file not found: .*nope.jsonl"):
        list(read_rows(str(tmp_path / "nope.jsonl")))
    (tmp_path / "d.xlsx").write_text("x")
    with pytest.raises(DataError, match=r"unknown dataset file type '\.xlsx' for .*d\.xlsx"):
        list(read_rows(str(tmp_path / "d.xlsx")))


def test_hub_name_goes_through_load_dataset_with_split(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(repo, split=None):
        calls.append((repo, split))
        if split is None:
            return datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS),
                                         "test": datasets.Dataset.from_list(ROWS[1:])})
        return datasets.Dataset.from_list(ROWS[:1])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert [r for _, r in read_rows("someone/data:test")] == ROWS[:1]
    assert [r for _, r in read_rows("someone/data")] == ROWS[:1]
    assert [r for _, r in read_rows("someone/data", split="eval")] == ROWS[1:]
    assert calls == [("someone/data", "test"), ("someone/data", "train"), ("someone/data", None)]


def test_hub_offline_gives_a_clear_error(monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    # Offline mode fails at once instead of retrying DNS for ~25 s on this network-less machine.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError, match="nobody-x/nothing-y: no local file of that name, and loading it as a "
                                        "Hugging Face hub dataset"):
        list(read_rows("nobody-x/nothing-y"))


def test_builtin_lumen_train_and_eval():
    train = list(read_rows("builtin:lumen"))
    held_out = list(read_rows("builtin:lumen", split="eval"))
    assert len(train) > 50 and len(held_out) > 5
    assert all(set(r) >= {"instruction", "input", "output"} for _, r in train + held_out)
    assert {r["instruction"] for _, r in train}.isdisjoint({r["instruction"] for _, r in held_out})
    with pytest.raises(DataError, match="unknown built-in dataset 'builtin:nope'"):
        list(read_rows("builtin:nope"))


# ---- dataset entries read through datasets.load_dataset (config name, data_files, split, streaming) -----

@pytest.fixture
def datasets_cache(tmp_path, monkeypatch):
    """`datasets` writes the Arrow cache of a non-streamed load into this test's directory."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def _jsonl(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail, encoding="utf-8")
    return path


def test_a_stream_is_read_only_as_far_as_it_is_consumed(tmp_path, datasets_cache):
    from fasttune.config import DataConfig, DatasetSpec
    from fasttune.data.formats import load_rows

    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(300)]
    # The json builder parses a file in blocks of megabytes, so the unread part is a second file: its
    # last line is no JSON.
    first = _jsonl(tmp_path / "part1.jsonl", rows)
    second = _jsonl(tmp_path / "part2.jsonl", rows[:2], tail='{"instruction": "broken\n')
    path = [str(first), str(second)]
    streamed = DatasetSpec(path="json", data_files=path, streaming=True, max_rows=5)
    got = load_rows(streamed, DataConfig(dataset=[streamed], max_rows=5))
    assert [n for n, _ in got.rows] == [1, 2, 3, 4, 5] and got.rows[4][1]["instruction"] == "q4"
    # Loaded whole, the same file fails at its broken last line: the stream above never read that far.
    whole = DatasetSpec(path="json", data_files=path)
    with pytest.raises(DataError, match=r"^json: datasets.load_dataset\('json', split='train', data_files="):
        list(read_rows(whole))
    with pytest.raises(DataError, match=r"^json, row 301: the datasets loader failed after row 300"):
        list(read_rows(streamed))  # streamed to the end, the broken line is named where it stops


def test_a_config_name_and_split_choose_the_files(tmp_path, datasets_cache):
    from fasttune.config import DatasetSpec

    repo = tmp_path / "repo"
    repo.mkdir()
    _jsonl(repo / "first.jsonl", [{"text": "first"}])
    _jsonl(repo / "second_train.jsonl", [{"text": "second train"}])
    _jsonl(repo / "second_test.jsonl", [{"text": "second test"}, {"text": "second test 2"}])
    (repo / "README.md").write_text(  # a hub dataset repository's card declares its configs so
        "---\nconfigs:\n- config_name: first\n  data_files: first.jsonl\n- config_name: second\n"
        "  data_files:\n  - split: train\n    path: second_train.jsonl\n"
        "  - split: test\n    path: second_test.jsonl\n---\n")
    for streaming in (False, True):
        spec = DatasetSpec(path=str(repo), name="second", split="test", streaming=streaming)
        assert [r["text"] for _, r in read_rows(spec)] == ["second test", "second test 2"]
        assert [r["text"] for _, r in read_rows(DatasetSpec(path=str(repo), name="first",
                                                            streaming=streaming))] == ["first"]
    with pytest.raises(DataError, match=r"name='third'"):
        list(read_rows(DatasetSpec(path=str(repo), name="third")))


def test_data_files_by_split(tmp_path, datasets_cache):
    from fasttune.config import DatasetSpec

    a = _jsonl(tmp_path / "a.jsonl", [{"text": "a"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"text": "b"}])
    spec = DatasetSpec(path="json", data_files={"train": [str(a)], "dev": [str(b)]}, split="dev")
    assert [r for _, r in read_rows(spec)] == [{"text": "b"}]
    with pytest.raises(DataError, match=r"split='nope'"):
        list(read_rows(DatasetSpec(path="json", data_files=str(a), split="nope")))


def test_a_local_file_streams_through_the_builder_of_its_type(tmp_path, datasets_cache):
    from fasttune.config import DatasetSpec

    rows = [{"text": f"row {i}", "n": f"n{i}"} for i in range(4)]  # (the csv builder would type digits)
    jsonl = _jsonl(tmp_path / "d.jsonl", rows)
    tsv = tmp_path / "d.tsv"
    tsv.write_text("text\tn\n" + "".join(f"{r['text']}\t{r['n']}\n" for r in rows), encoding="utf-8")
    for path in (jsonl, tsv):
        spec = DatasetSpec(path=str(path), streaming=True)
        assert [r for _, r in read_rows(spec)] == rows  # as our own reader reads the same file
        assert [r for _, r in read_rows(str(path))] == rows
    with pytest.raises(DataError, match=r"path names a file and data_files names more; give the builder"):
        list(read_rows(DatasetSpec(path=str(jsonl), data_files=[str(jsonl)])))
