"""The conventions of every subcommand's parser: both flag spellings, negative numbers, no abbreviations."""

from __future__ import annotations

import argparse

import pytest

from fasttune.cli import build_parser, main


def leaf_parsers(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, argparse.ArgumentParser]:
    found = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                children = leaf_parsers(sub, f"{prefix}{name} ")
                found.update(children or {f"{prefix}{name}": sub})
    return found


def test_every_option_is_named_with_underscores_only():
    for name, parser in leaf_parsers(build_parser()).items():
        for action in parser._actions:
            for opt in action.option_strings:
                assert not (opt.startswith("--") and "-" in opt[2:]), f"fasttune {name} {opt}"


def test_every_underscore_option_also_answers_to_dashes():
    checked = 0
    for name, parser in leaf_parsers(build_parser()).items():
        for action in parser._actions:
            for opt in action.option_strings:
                if "_" in opt:
                    dashed = "--" + opt[2:].replace("_", "-")
                    assert parser._underscored([dashed, "x", f"{dashed}=y"]) == [opt, "x", f"{opt}=y"], name
                    checked += 1
    assert checked > 60  # the train flags alone are more than that


def parse(*argv: str) -> dict:
    return vars(build_parser().parse_args(list(argv)))


@pytest.mark.parametrize("underscored, dashed", [
    (["train", "--max_steps", "3", "--output_dir=runs/a-b", "--load_in_4bit"],
     ["train", "--max-steps", "3", "--output-dir=runs/a-b", "--load-in-4bit"]),
    (["merge", "runs/x", "--out", "m", "--max_shard_size", "1GB", "--no_check"],
     ["merge", "runs/x", "--out", "m", "--max-shard-size", "1GB", "--no-check"]),
    (["generate", "--max_new_tokens", "3", "--no_stream", "hi"],
     ["generate", "--max-new-tokens", "3", "--no-stream", "hi"]),
    (["data", "preview", "--max_seq_length", "64", "--text_field", "body"],
     ["data", "preview", "--max-seq-length", "64", "--text-field", "body"]),
])
def test_both_spellings_parse_the_same(underscored, dashed):
    assert parse(*underscored) == parse(*dashed)
    assert parse(*underscored)["output_dir" if "train" in underscored else "command"] is not None


def test_values_and_arguments_after_double_dash_are_kept():
    args = parse("generate", "--raw", "--", "--max-new-tokens")
    assert args["prompt"] == "--max-new-tokens" and args["max_new_tokens"] == 256
    assert parse("train", "--dataset", "my-data.jsonl")["dataset"] == ["my-data.jsonl"]  # one entry


@pytest.mark.parametrize("value", ["-1e-4", "-2E-5", "-0.5", "-3"])
def test_a_negative_number_is_a_value_not_a_flag(value):
    assert parse("train", "--learning_rate", value)["learning_rate"] == value
    assert parse("train", "--learning-rate", value)["learning_rate"] == value


def test_a_negative_learning_rate_is_refused_by_validation(capsys):
    assert main(["train", "--learning_rate", "-1e-4"]) == 2
    assert "learning_rate must be positive" in capsys.readouterr().err


def test_dashed_abbreviations_are_errors_too(capsys):
    for argv in (["train", "--learning-rat", "1"], ["merge", "x", "--out", "o", "--max-shard", "1GB"]):
        with pytest.raises(SystemExit) as e:
            build_parser().parse_args(argv)
        assert e.value.code == 2
        assert "unrecognized arguments" in capsys.readouterr().err
