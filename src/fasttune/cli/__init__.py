"""The `fasttune` command: each subcommand parses its options and calls one API function.

Each module of this package registers its subcommands (`register(subs)`); `parser.py` holds the
conventions they share. A mistake the user can fix (bad option, bad data row, model that cannot load)
prints one line to stderr and exits with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from fasttune.cli import export, hub, infer, serve, train
from fasttune.cli.parser import EXIT_USER_ERROR, Parser, print_help
from fasttune.fs import is_filesystem_error
from fasttune.train.interrupts import TrainingStopped

# Each registers its subcommands in this order (the order of `fasttune --help`).
COMMAND_MODULES = (train, infer, export, hub, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="fasttune", description="Fine-tune a language model with LoRA on your own data.",
        epilog="Run 'fasttune COMMAND --help' for the options of a command. Options are written "
               "--name_with_underscores, as in a YAML config; --name-with-dashes works too.")
    parser.add_argument("--debug", action="store_true",
                        help="Show the full traceback of an error (default: off)")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.register(subs)
    parser.set_defaults(func=lambda a: print_help(parser))
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the input is wrong', not 'fasttune has a bug'."""
    from fasttune.api import ModelLoadError
    from fasttune.config import ConfigError
    from fasttune.data.errors import DataError
    from fasttune.export.source import ExportError
    from fasttune.hub import HubError
    from fasttune.run_dir import RunDirError, RunNotFound
    from fasttune.train.rewards import RewardError
    from fasttune.train.step_guard import TrainingError

    return (ConfigError, DataError, ModelLoadError, ExportError, RunDirError, RunNotFound, TrainingError,
            HubError, RewardError)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    user_errors = _user_errors()
    try:
        return args.func(args)
    except user_errors as e:
        if args.debug:
            raise
        print(f"fasttune: error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except OSError as e:  # a full disk, a read-only or missing directory: one line naming the path
        if args.debug or not is_filesystem_error(e):
            raise
        print(f"fasttune: error: {e.filename}: {e.strerror}", file=sys.stderr)
        return EXIT_USER_ERROR
    except TrainingStopped as e:  # SIGTERM/SIGINT: the checkpoint is written; exit as the signal would
        print(f"fasttune: {e}", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\nfasttune: interrupted (continue a training run with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
