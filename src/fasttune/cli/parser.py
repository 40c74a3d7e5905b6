"""The conventions every `fasttune` subcommand's parser follows, in one place.

- One flag style: options are named `--name_with_underscores`, like the config fields, and every one also
  answers to `--name-with-dashes`; `--help` shows the underscore name.
- No abbreviations: `--learning_rat` is an error, never a silent `--learning_rate`.
- A negative number, in scientific notation too (`--learning_rate -1e-4`), is a value, not an option.
- `add_command` builds a subcommand: help, description, `--debug`, and the function it runs.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Sequence
from typing import Any

EXIT_USER_ERROR = 2

Command = Callable[[argparse.Namespace], int]

# argparse's own pattern takes '-5' and '-.5' as values but '-1e-4' as an option string
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class Parser(argparse.ArgumentParser):
    """ArgumentParser with the conventions above; subparsers made from it are Parsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("allow_abbrev", False)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        import sys

        argv = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(self._underscored(argv), namespace)

    def _underscored(self, argv: list[str]) -> list[str]:
        """`--a-b` and `--a-b=v` -> `--a_b`, `--a_b=v` where this parser knows `--a_b`; stops at `--`.

        Each parser rewrites only its own options: a subcommand's parser sees its own arguments when
        argparse hands them over, so a value that happens to look like another command's flag is kept.
        """
        known = self._option_string_actions
        out = []
        for i, arg in enumerate(argv):
            if arg == "--":
                return out + argv[i:]
            name, eq, value = arg.partition("=")
            if name.startswith("--") and "-" in name[2:]:
                canonical = "--" + name[2:].replace("-", "_")
                if canonical in known and name not in known:
                    arg = canonical + eq + value
            out.append(arg)
        return out


def add_command(subs: argparse._SubParsersAction, name: str, help_text: str, description: str,
                func: Command) -> argparse.ArgumentParser:
    """A subcommand `name` that runs `func(args)`, with its own `--debug`."""
    p = subs.add_parser(name, help=help_text, description=description)
    # SUPPRESS: a subcommand's --debug must not overwrite the top-level one with its default
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="Show the full traceback of an error (default: off)")
    p.set_defaults(func=func)
    return p


def add_group(subs: argparse._SubParsersAction, name: str, help_text: str, description: str,
              metavar: str = "COMMAND") -> argparse._SubParsersAction:
    """A command that only holds subcommands (`fasttune data preview`); alone it prints its help."""
    p = subs.add_parser(name, help=help_text, description=description)
    p.set_defaults(func=lambda _args: print_help(p))
    return p.add_subparsers(dest=f"{name}_command", metavar=metavar)


def print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0
