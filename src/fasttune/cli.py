"""The `fasttune` command: each subcommand parses its options and calls one API function.

No logic lives here. A mistake the user can fix (bad option, bad data row, model that cannot load)
prints one line to stderr and exits with status 2; `--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from fasttune.config import ConfigError, add_config_flags, config_from_args

EXIT_USER_ERROR = 2


# ---- subcommands: parse -> call the API -> exit code ------------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    from fasttune.api import train

    train(config_from_args(args))
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from fasttune.api import preview_data

    print(preview_data(config_from_args(args, sections=PREVIEW_SECTIONS), n=args.n))
    return 0


PREVIEW_SECTIONS = ("model", "data")


# ---- the parser --------------------------------------------------------------------------------

def _subparser(subs: argparse._SubParsersAction, name: str, help_text: str, description: str,
               func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    # allow_abbrev=False: '--learning_rat' must be an error, not a silent '--learning_rate'
    p = subs.add_parser(name, help=help_text, description=description, allow_abbrev=False,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    # SUPPRESS: a subcommand's --debug must not overwrite the top-level one with its default
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="Show the full traceback of an error (default: off)")
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fasttune", description="Fine-tune a language model with LoRA on your own data.",
        epilog="Run 'fasttune COMMAND --help' for the options of a command.", allow_abbrev=False)
    parser.add_argument("--debug", action="store_true",
                        help="Show the full traceback of an error (default: off)")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = _subparser(subs, "train", "fine-tune a model (defaults: smollm2-135m on the embedded dataset)",
                       "Fine-tune a model with LoRA. Options come from the defaults, then --config FILE, "
                       "then the flags given here (each later one wins).\n"
                       "Example: fasttune train --dataset my.jsonl --max_steps 200 --output_dir runs/mine",
                       cmd_train)
    train.add_argument("--config", metavar="FILE", default=None,
                       help="YAML file with options (e.g. a run's run.yaml); flags override it "
                            "(default: none)")
    add_config_flags(train)

    data = subs.add_parser("data", help="inspect datasets", description="Inspect datasets.",
                           allow_abbrev=False)
    data.set_defaults(func=lambda a: _print_help(data))
    data_subs = data.add_subparsers(dest="data_command", metavar="COMMAND")
    preview = _subparser(data_subs, "preview", "show rendered rows with the trained tokens marked",
                         "Render the first rows as the model will see them, marking the tokens that are "
                         "trained (the response) apart from the prompt.", cmd_data_preview)
    preview.add_argument("--config", metavar="FILE", default=None,
                         help="YAML file with options; flags override it (default: none)")
    preview.add_argument("--n", type=int, default=3, metavar="N", help="Rows to show (default: 3)")
    add_config_flags(preview, PREVIEW_SECTIONS)

    from fasttune.export.cli_commands import register as register_export
    from fasttune.infer.cli_commands import register as register_infer

    register_infer(subs)                  # generate, chat, eval
    register_export(subs, _subparser)     # merge, export gguf|ollama

    parser.set_defaults(func=lambda a: _print_help(parser))
    return parser


def _print_help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 0


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the input is wrong', not 'fasttune has a bug'."""
    from fasttune.api import ModelLoadError
    from fasttune.data.errors import DataError
    from fasttune.export.source import ExportError

    return (ConfigError, DataError, ModelLoadError, ExportError)


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
    except KeyboardInterrupt:
        print("\nfasttune: interrupted (continue a training run with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
