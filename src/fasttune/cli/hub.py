"""`fasttune push`: upload an adapter, a merged model or a GGUF file, with its model card, to the Hub."""

from __future__ import annotations

import argparse

from fasttune.cli.parser import add_command


def cmd_push(args: argparse.Namespace) -> int:
    from fasttune.hub import push_path

    url = push_path(args.path, args.repo, token=args.token, private=args.private or None,
                    revision=args.revision, endpoint=args.endpoint, commit_message=args.commit_message)
    print(f"fasttune: pushed {args.path} to {args.repo}: {url}", flush=True)
    return 0


def register(subs: argparse._SubParsersAction) -> None:
    """Add `push` to the main parser's subcommands."""
    push = add_command(
        subs, "push", "upload a run's adapter, a merged model or a GGUF file to the Hugging Face Hub",
        "Upload to a Hub model repository (created if it does not exist), in one commit, through "
        "huggingface_hub: a run or adapter directory (the adapter files and a model card written for the "
        "repository), a merged model directory (fasttune merge; its files and card), or a .gguf file "
        "(fasttune export gguf; the file and its card NAME.README.md as README.md).\n"
        "Example: fasttune push runs/default --repo me/lumen-adapter", cmd_push)
    push.add_argument("path", metavar="PATH", help="run directory, adapter directory, merged model directory "
                                                   "or .gguf file")
    push.add_argument("--repo", required=True, metavar="ID",
                      help="repository id, e.g. me/my-adapter (required)")
    push.add_argument("--private", action="store_true", help="create the repository private (default: the "
                                                              "Hub's default visibility)")
    push.add_argument("--token", default=None, metavar="TOKEN",
                      help="Hub token (default: HF_TOKEN or the saved login)")
    push.add_argument("--revision", default=None, metavar="BRANCH",
                      help="branch to commit to (default: main)")
    push.add_argument("--endpoint", default=None, metavar="URL",
                      help="Hub endpoint (default: HF_ENDPOINT or https://huggingface.co)")
    push.add_argument("--commit_message", default=None, metavar="TEXT",
                      help="commit message (default: 'Upload adapter|merged|gguf with fasttune')")
