"""Reading raw rows from wherever the data lives: JSON, JSONL, CSV/TSV, Parquet, a directory saved
with `datasets.save_to_disk`, a hub dataset, or an embedded 'builtin:' dataset.

`read_rows` yields `(row_number, row)` where `row` is a dict, or a `DataError` for a row that could
not be read (bad JSON line, bad UTF-8, ...) so that the caller decides whether to stop or skip.
Row numbers are 1-based and what the user sees: the line of a JSONL file, the spreadsheet row of a
CSV file (header = row 1), the element of a JSON list, the record of a Parquet file or dataset.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from importlib.resources import as_file
from pathlib import Path
from typing import Any

from fasttune.config import DatasetSpec
from fasttune.data.builtin import builtin_file, is_builtin
from fasttune.data.errors import DataError

Row = tuple[int, dict[str, Any] | DataError]

SUFFIXES = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".tsv": "csv",
            ".parquet": "parquet", ".pq": "parquet"}
EVAL_SPLITS = ("validation", "test", "eval", "valid")
# owner/name or owner/name:split — the hub's repository id grammar
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")


# Column roles with a fixed name in their format (TRL's): a dataset entry's `columns` renames its own
# column to the role. The other roles (instruction, input, output, messages, text) are the *_field options,
# which data/mixing.py sets per entry instead, so errors name the entry's own column.
RENAMED_ROLES = ("prompt", "completion", "chosen", "rejected", "label", "tools")


def read_rows(source: str | DatasetSpec, split: str | None = None) -> Iterator[Row]:
    """Every row of `source` in order. Raises DataError for a source that cannot be opened at all.

    A DatasetSpec (one entry of a `dataset` list) is read through `datasets.load_dataset` when it names a
    config, data files or streaming, else as its path; its `split` wins over `split`, and its `columns`
    apply to its rows (`_map_columns`).
    """
    if isinstance(source, DatasetSpec):
        rows = _read_loader(source, source.split or split) if source.uses_loader else \
            read_rows(source.path, source.split or split)
        yield from _map_columns(rows, source)
        return
    if is_builtin(source):
        resource = builtin_file(source, split)
        with as_file(resource) as path:
            yield from _read_file(Path(path), f"{source} ({resource.name})", None)
        return
    path = Path(source).expanduser()
    if path.is_dir():
        yield from _read_saved(path, split, source)
    elif path.is_file():
        yield from _read_file(path, source, split)
    elif _HUB_NAME.match(source) and path.suffix.lower() not in SUFFIXES:
        yield from _read_hub(source, split)
    else:
        raise DataError(f"dataset file not found: {source}")


def _read_file(path: Path, name: str, split: str | None) -> Iterator[Row]:
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unknown dataset file type '{path.suffix}' for {name} "
                        f"(known: {', '.join(sorted(SUFFIXES))})")
    if kind == "json":
        yield from _read_json(path, name, split)
    elif kind == "jsonl":
        yield from _read_jsonl(path.read_bytes(), name)
    elif kind == "csv":
        yield from _read_csv(path, name, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        yield from _read_parquet(path, name)


def _decode_whole(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"not valid UTF-8 text (line {line}, byte {e.start}); save the file as UTF-8",
                        file=name, reason="invalid UTF-8") from None


def _read_json(path: Path, name: str, split: str | None) -> Iterator[Row]:
    data = path.read_bytes()
    text = _decode_whole(data, name)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":
            # One JSON value per line saved as .json (what `datasets` writes by default): read it as JSONL.
            yield from _read_jsonl(data, name)
            return
        raise DataError(f"not valid JSON (line {e.lineno}, column {e.colno}): {e.msg}",
                        file=name, reason="not JSON") from None
    if isinstance(obj, dict):
        # {"train": [...], "test": [...]}: the split asked for; a bare {"data": [...]} serves any split.
        wanted = {None: ("train",), "train": ("train",), "eval": EVAL_SPLITS}.get(split, (split,))
        keys = [k for k in (*wanted, "data", "rows", "examples") if isinstance(obj.get(k), list)]
        if not keys:
            raise DataError(f"a JSON dataset must be a list of objects, or an object with a '{wanted[0]}' or "
                            f"'data' list; found an object with keys {sorted(obj)[:10]}", file=name)
        obj = obj[keys[0]]
    if not isinstance(obj, list):
        raise DataError(f"a JSON dataset must be a list of objects, found {type(obj).__name__}", file=name)
    for i, item in enumerate(obj, start=1):
        yield i, _as_object(item, name, i)


def _as_object(item: Any, name: str, row: int) -> dict[str, Any] | DataError:
    if isinstance(item, dict):
        return item
    return DataError(f"expected a JSON object, found {type(item).__name__}", file=name, row=row,
                     reason="not an object")


def _read_jsonl(data: bytes, name: str) -> Iterator[Row]:
    for lineno, raw in enumerate(data.split(b"\n"), start=1):
        if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            yield lineno, DataError(f"not valid UTF-8 (byte {e.start} of the line)", file=name, row=lineno,
                                    reason="invalid UTF-8")
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            yield lineno, DataError(f"not valid JSON (column {e.colno}): {e.msg}", file=name, row=lineno,
                                    reason="not JSON")
            continue
        yield lineno, _as_object(item, name, lineno)


def _read_csv(path: Path, name: str, delimiter: str) -> Iterator[Row]:
    text = _decode_whole(path.read_bytes(), name)
    # strict: a quote opened and never closed is an error, not a last cell that swallows the rest of the file
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    try:
        header = next(reader)
    except StopIteration:
        return
    except csv.Error as e:
        raise DataError(f"not a valid CSV header: {e}", file=name, row=1) from None
    if not header or len(set(header)) != len(header):
        raise DataError(f"the header row must name every column once, found {header}", file=name, row=1)
    row = 1  # the header is row 1, as a spreadsheet shows it
    while True:
        row += 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            hint = " (a quote opened in this row is never closed)" if "end of data" in str(e) else ""
            yield row, DataError(f"not valid CSV: {e}{hint}", file=name, row=row, reason="not CSV")
            continue
        if not cells:
            continue
        if len(cells) > len(header):
            yield row, DataError(f"{len(cells)} cells but the header names {len(header)} columns",
                                 file=name, row=row, reason="not CSV")
            continue
        # Cells the row lacks are None (missing), not "" (present and empty).
        yield row, dict(zip(header, cells + [None] * (len(header) - len(cells))))


def _read_parquet(path: Path, name: str) -> Iterator[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading Parquet files needs pyarrow: pip install 'fasttune[data]'",
                        file=name) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError for a damaged file
        raise DataError(f"not a readable Parquet file: {e}", file=name) from None
    row = 0
    for batch in pf.iter_batches(batch_size=1024):
        for item in batch.to_pylist():
            row += 1
            yield row, item


def _datasets_module(name: str):
    try:
        import datasets
    except ImportError:
        raise DataError("reading saved or hub datasets needs the datasets library: "
                        "pip install 'fasttune[data]'", file=name) from None
    return datasets


def _pick_split(ds: Any, split: str | None, name: str) -> Any:
    """A Dataset from a Dataset or DatasetDict: the named split, 'train' by default; split 'eval' means
    the first of validation, test, eval, valid that exists."""
    if isinstance(ds, dict):  # DatasetDict is a dict of split name -> Dataset
        want = split or "train"
        if want == "eval":
            want = next((s for s in EVAL_SPLITS if s in ds), "validation")
        if want not in ds:
            raise DataError(f"no split '{want}' (splits: {', '.join(ds.keys())})", file=name)
        return ds[want]
    return ds


def _read_saved(path: Path, split: str | None, name: str) -> Iterator[Row]:
    if not any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json", "state.json")):
        raise DataError("a dataset directory must be one saved with datasets.save_to_disk "
                        "(no dataset_dict.json or dataset_info.json found)", file=name)
    datasets = _datasets_module(name)
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:  # datasets raises several types for a damaged directory
        raise DataError(f"could not load the saved dataset: {type(e).__name__}: {e}", file=name) from None
    yield from enumerate(_pick_split(ds, split, name), start=1)


def _read_hub(source: str, split: str | None) -> Iterator[Row]:
    repo, _, name_split = source.partition(":")
    want = name_split or split or "train"
    datasets = _datasets_module(source)
    try:
        # split 'eval' is ours, not the hub's: load every split and pick one below.
        ds = datasets.load_dataset(repo, split=None if want == "eval" else want)
    except Exception as e:  # offline, unknown repo, gated, missing split: all end here
        raise DataError(
            f"no local file of that name, and loading it as a Hugging Face hub dataset (split '{want}') "
            f"failed: {type(e).__name__}: {str(e)[:500]}. Hub datasets need network access or a local "
            "cache; to use a file, check its path.", file=source) from None
    yield from enumerate(_pick_split(ds, want, source), start=1)


def _read_loader(spec: DatasetSpec, split: str | None) -> Iterator[Row]:
    """The rows `datasets.load_dataset(path, name, data_files=, split=, streaming=)` gives. Streamed, rows
    are read one at a time as the caller asks for them: nothing holds the whole set."""
    datasets = _datasets_module(spec.path)
    want = split or "train"
    path, files, extra = _loader_target(spec)
    args = {"name": spec.name, "data_files": files, "streaming": spec.streaming, **extra}
    shown = ", ".join(f"{k}={v!r}" for k, v in args.items() if v not in (None, False))
    try:
        ds = datasets.load_dataset(path, split=None if want == "eval" else want, **args)
    except Exception as e:  # offline, unknown repo or config, missing split or files: all end here
        call = f"datasets.load_dataset({path!r}, split={want!r}{', ' + shown if shown else ''})"
        raise DataError(f"{call} failed: {type(e).__name__}: {str(e)[:500]}", file=spec.path) from None
    rows = iter(_pick_split(ds, want, spec.path))
    number = 0
    while True:
        try:
            item = next(rows)
        except StopIteration:
            return
        except Exception as e:  # a streamed file that fails to parse part-way
            raise DataError(f"the datasets loader failed after row {number}: {type(e).__name__}: "
                            f"{str(e)[:300]}", file=spec.path, row=number + 1) from None
        number += 1
        yield number, item


_BUILDERS = {"json": "json", "jsonl": "json", "csv": "csv", "parquet": "parquet"}


def _loader_target(spec: DatasetSpec) -> tuple[str, Any, dict[str, Any]]:
    """(path, data_files, builder options) for `load_dataset`: a local file is read by the builder of its
    type (`datasets` looks a bare file name up on the hub), anything else goes as it was given."""
    path = Path(spec.path).expanduser()
    if not path.is_file():
        return spec.path, spec.data_files, {}
    kind = SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"unknown dataset file type '{path.suffix}' (known: {', '.join(sorted(SUFFIXES))})",
                        file=spec.path)
    if spec.data_files is not None:
        raise DataError(f"path names a file and data_files names more; give the builder ({_BUILDERS[kind]}) "
                        "as path with every file in data_files", file=spec.path)
    return _BUILDERS[kind], str(path), {"sep": "\t"} if path.suffix.lower() == ".tsv" else {}


def _map_columns(rows: Iterator[Row], spec: DatasetSpec) -> Iterator[Row]:
    """`rows` with the entry's TRL-named columns renamed to their role ({completion: answer}: the
    column 'answer' becomes 'completion'). A mapped column that no row has, once every row was read, is
    an error naming it."""
    if not spec.columns:
        yield from rows
        return
    seen: set[str] = set()
    for number, row in rows:
        if isinstance(row, dict):
            seen.update(c for c in spec.columns.values() if c in row)
            renames = {c: r for r, c in spec.columns.items() if r in RENAMED_ROLES and c in row}
            if renames:
                # the role's own column, where the row also has one, gives way to the mapped column
                row = {renames.get(k, k): v for k, v in row.items()
                       if k in renames or k not in renames.values()}
        yield number, row
    for role, column in spec.columns.items():
        if column not in seen:
            raise DataError(f"column '{column}' (columns.{role}) is not in any row of the file",
                            file=spec.path, field=column, reason="unknown column")
