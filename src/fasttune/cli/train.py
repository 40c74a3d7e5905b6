"""`fasttune train` and `fasttune data preview`: options generated from the run config, then the API."""

from __future__ import annotations

import argparse

from fasttune.cli.parser import add_command, add_group
from fasttune.config import add_config_flags, config_from_args

PREVIEW_SECTIONS = ("model", "data", "method")


def cmd_train(args: argparse.Namespace) -> int:
    from fasttune.api import train
    from fasttune.train.distributed import launched_by_torchrun, shutdown

    run = train
    if launched_by_torchrun():
        # torchrun's failure report then shows this rank's own error, not only its exit status
        from torch.distributed.elastic.multiprocessing.errors import record

        run = record(train)
    run(config_from_args(args))
    shutdown()  # leave torchrun's process group, if this process joined one
    return 0


def cmd_data_preview(args: argparse.Namespace) -> int:
    from fasttune.api import preview_data

    print(preview_data(config_from_args(args, sections=PREVIEW_SECTIONS), n=args.n))
    return 0


def register(subs: argparse._SubParsersAction) -> None:
    """Add train and data preview to the `fasttune` parser's subcommands."""
    train = add_command(
        subs, "train", "fine-tune a model (defaults: smollm2-135m on the embedded dataset)",
        "Fine-tune a model with LoRA. Options come from the defaults, then --config FILE, "
        "then the flags given here (each later one wins).\n"
        "Example: fasttune train --dataset my.jsonl --max_steps 200 --output_dir runs/mine", cmd_train)
    train.add_argument("--config", metavar="FILE", default=None,
                       help="YAML file with options (e.g. a run's run.yaml); flags override it "
                            "(default: none)")
    add_config_flags(train)

    data_subs = add_group(subs, "data", "inspect datasets", "Inspect datasets.")
    preview = add_command(data_subs, "preview", "show rendered rows with the trained tokens marked",
                          "Render the first rows as the model will see them, marking the tokens that are "
                          "trained (the response) apart from the prompt.", cmd_data_preview)
    preview.add_argument("--config", metavar="FILE", default=None,
                         help="YAML file with options; flags override it (default: none)")
    preview.add_argument("--n", type=int, default=3, metavar="N", help="Rows to show (default: 3)")
    add_config_flags(preview, PREVIEW_SECTIONS)
