"""`fasttune merge` / `fasttune export gguf|ollama`: options, defaults in --help, errors as exit status 2."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fasttune.cli import build_parser, main
from fasttune.cli.export import GGUF_TYPE_NAMES
from fasttune.export.gguf import GGUF_TYPES


def _help(*argv: str) -> str:
    sub = build_parser()
    for name in argv:
        sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
    return " ".join(sub.format_help().split())  # help wraps lines; compare words


def test_type_names_match_the_writer():
    assert GGUF_TYPE_NAMES == tuple(GGUF_TYPES)


def test_help_shows_every_default():
    merge = _help("merge")
    for text in (
        "(default: bf16)",
        "(default: 2GB)",
        "(default: cpu)",
        "--no_check",
        "(default: the run's model)",
    ):
        assert text in merge
    assert "(default: f16)" in _help("export", "gguf")
    assert "(default: q8_0)" in _help("export", "ollama")


def test_building_the_parser_imports_no_torch():
    code = "import sys; from fasttune.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_merge_command_writes_and_checks(run_dir, tmp_path, capsys):
    assert main(["merge", str(run_dir), "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "m" / "model.safetensors").is_file()
    assert "wrote merged checkpoint" in out and "greedy answer identical" in out
    assert "ready for vLLM and TGI" in out and "vllm serve" in out


def test_export_commands(run_dir, opt_dir, tmp_path, capsys):
    assert (
        main(["export", "ollama", str(run_dir), "--out", str(tmp_path / "o"), "--type", "f16", "--no_check"])
        == 0
    )
    assert (tmp_path / "o" / "Modelfile").is_file() and (tmp_path / "o" / "model.gguf").is_file()
    assert "ollama create" in capsys.readouterr().out
    # An architecture the writer does not cover: one line on stderr, exit status 2.
    assert main(["export", "gguf", str(opt_dir), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert "llama.cpp has no OPT architecture" in err and len(err.strip().splitlines()) == 1
    assert main(["merge", str(tmp_path / "missing"), "--out", str(tmp_path / "m")]) == 2
    assert "no such run" in capsys.readouterr().err


def test_bad_type_is_refused_by_the_parser(run_dir, tmp_path):
    with pytest.raises(SystemExit):
        main(["export", "gguf", str(run_dir), "--out", str(tmp_path / "x.gguf"), "--type", "q3_k"])


def test_an_existing_out_is_replaced_only_with_overwrite_and_a_failed_merge_keeps_it(run_dir, gpt2_adapter,
                                                                                       tmp_path, capsys):
    out = tmp_path / "m"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    assert main(["merge", str(run_dir), "--out", str(out), "--no_check"]) == 2
    err = capsys.readouterr().err
    assert "is a directory that is not empty; pass --overwrite" in err and (out / "mine.txt").is_file()
    (tmp_path / "x.gguf").write_bytes(b"old")
    assert main(["export", "gguf", str(run_dir), "--out", str(tmp_path / "x.gguf"), "--no_check"]) == 2
    assert "is an existing file" in capsys.readouterr().err and (tmp_path / "x.gguf").read_bytes() == b"old"
    # the adapter does not fit the base it is told to merge into: the error comes mid-write, --out stays
    base = gpt2_adapter[0]
    assert main(["merge", str(run_dir), "--out", str(out), "--base", str(base), "--overwrite",
                 "--no_check"]) == 2
    assert "has no weight in the base checkpoint" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert main(["merge", str(run_dir), "--out", str(out), "--overwrite", "--no_check"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "mine.txt").exists()
