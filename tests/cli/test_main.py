"""The `fasttune` command line: help for every option with its default, and one-line errors with exit 2."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from dataclasses import fields

import pytest

from fasttune.cli import build_parser, main
from fasttune.config import SECTIONS


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    """Every leaf subcommand parser by its full name ('train', 'data preview', 'export gguf', ...)."""
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                full = f"{prefix}{name}"
                children = subcommands(sub, full + " ")
                found.update(children or {full: sub})
    return found


def test_every_subcommand_exists():
    names = set(subcommands(build_parser()))
    assert {"train", "data preview", "generate", "chat", "eval", "merge"} <= names


def test_every_option_of_every_subcommand_shows_its_default():
    for name, parser in subcommands(build_parser()).items():
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            required = action.required and "required" in (action.help or "")
            shown = action.help and ("default" in action.help or required)
            assert shown, f"fasttune {name} {action.option_strings[0]}: help gives no default"


def test_train_help_lists_every_config_field(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for cls in SECTIONS.values():
        for f in fields(cls):
            assert f"--{f.name}" in out, f.name
    assert "(default: smollm2-135m)" in out and "(default: builtin:lumen)" in out
    assert "--config FILE" in out


def test_data_preview_help_has_data_options_not_training_ones(capsys):
    with pytest.raises(SystemExit):
        main(["data", "preview", "--help"])
    out = capsys.readouterr().out
    assert "--dataset" in out and "--n N" in out and "--max_seq_length" in out
    assert "--learning_rate" not in out


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


BAD_ROWS = [
    {"instruction": "What is two plus two?", "output": "Four."},
    {"instruction": "Name a colour.", "output": "Blue."},
    {"instruction": "Name a fruit."},  # row 3: no output
]


@pytest.fixture(scope="module")
def converted_model():
    """The embedded model converted into this run's cache. Its first use converts the GGUF, and transformers'
    reader draws a progress bar on stderr then; tests that count stderr's lines see the command's alone."""
    from fasttune.config import ModelConfig
    from fasttune.models.loading import resolve_source

    return resolve_source(ModelConfig())


@pytest.mark.parametrize("command", [["data", "preview"], ["train", "--max_steps", "1"]])
def test_bad_dataset_exits_2_naming_file_row_field(tmp_path, capsys, command, converted_model):
    data = write_jsonl(tmp_path / "broken.jsonl", BAD_ROWS)
    if command[0] == "train":
        command += ["--output_dir", str(tmp_path / "run")]
    code = main([*command, "--dataset", str(data)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert str(data) in err and "row 3" in err and "'output'" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # stopped before any training


def test_bad_json_line_names_the_row(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": \n')
    assert main(["data", "preview", "--dataset", str(data)]) == 2
    err = capsys.readouterr().err
    assert "row 2" in err and "d.jsonl" in err


def test_bad_config_value_and_file(tmp_path, capsys):
    assert main(["data", "preview", "--max_seq_length", "long"]) == 2
    assert "max_seq_length: expected an integer or auto, got 'long'" in capsys.readouterr().err
    cfg = tmp_path / "run.yaml"
    cfg.write_text("train:\n  learning_rat: 1\n")
    assert main(["train", "--config", str(cfg)]) == 2
    assert "unknown key 'train.learning_rat'" in capsys.readouterr().err


def test_unknown_abbreviated_flag_and_bad_choice_are_argparse_errors(capsys):
    parser = build_parser()  # parse only: a wrongly accepted flag must not start a training run
    for argv in (["train", "--learning_rat", "1"], ["train", "--lr", "1"],
                 ["data", "preview", "--datas", "x"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(argv)
        assert e.value.code == 2, argv
        assert "unrecognized arguments" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        parser.parse_args(["train", "--optim", "sgd"])
    assert e.value.code == 2 and "invalid choice: 'sgd'" in capsys.readouterr().err


def test_missing_model_is_one_line(tmp_path, capsys):
    data = write_jsonl(tmp_path / "ok.jsonl", BAD_ROWS[:2])
    code = main(["data", "preview", "--dataset", str(data), "--model_name", str(tmp_path / "nope.gguf")])
    assert code == 2
    err = capsys.readouterr().err
    assert "nope.gguf" in err and len(err.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    data = write_jsonl(tmp_path / "broken.jsonl", BAD_ROWS)
    from fasttune.data.errors import DataError

    with pytest.raises(DataError):
        main(["data", "preview", "--debug", "--dataset", str(data)])
    with pytest.raises(DataError):
        main(["--debug", "data", "preview", "--dataset", str(data)])


def test_preview_marks_trained_tokens(tmp_path, capsys):
    data = write_jsonl(tmp_path / "ok.jsonl", BAD_ROWS[:2])
    assert main(["data", "preview", "--dataset", str(data), "--n", "1"]) == 0
    out = capsys.readouterr().out
    shown = out.split("train data")[0]
    assert "What is two plus two?" in shown and "«Four." in shown and "Name a colour" not in shown


def test_preview_shows_a_tool_calling_row(tmp_path, capsys):
    tools = [{"type": "function", "function": {"name": "tune_string", "parameters": {"type": "object"}}}]
    row = {"tools": tools, "messages": [
        {"role": "user", "content": "Tune the lowest string."},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "tune_string", "arguments": {"string": 12}}}]},
        {"role": "tool", "content": "tuned to 436 Hz"},
        {"role": "assistant", "content": "Done: string 12 is at 436 Hz."}]}
    data = write_jsonl(tmp_path / "tools.jsonl", [row])
    assert main(["data", "preview", "--dataset", str(data), "--chat_template", "qwen-2.5", "--n", "1"]) == 0
    shown = capsys.readouterr().out.split("train data")[0]
    assert '<tools>\n{"type": "function", "function": {"name": "tune_string"' in shown
    call = '{"name": "tune_string", "arguments": {"string": 12}}'
    assert f"«<tool_call>\n{call}\n</tool_call><|im_end|>»" in shown
    assert "<tool_response>\ntuned to 436 Hz\n</tool_response>" in shown and "«tuned" not in shown
    assert "«Done: string 12 is at 436 Hz.<|im_end|>»" in shown
    # the tokenizer's own template (SmolLM2's ChatML) writes no tools: the row is refused, naming the field
    assert main(["data", "preview", "--dataset", str(data)]) == 2
    assert f"{data}, row 1, field 'tools': the chat template ignores the tools" in capsys.readouterr().err


def test_python_dash_m_and_console_script():
    out = subprocess.run([sys.executable, "-m", "fasttune", "--help"], capture_output=True, text=True,
                         check=True)
    assert "train" in out.stdout and "data" in out.stdout
