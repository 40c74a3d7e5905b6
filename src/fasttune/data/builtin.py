"""Embedded datasets: 'builtin:<name>' → its train and held-out files in fasttune/assets."""

from __future__ import annotations

from importlib.resources import files
from importlib.resources.abc import Traversable

from fasttune.data.errors import DataError

PREFIX = "builtin:"

# name -> (train file, eval file), both under src/fasttune/assets/
BUILTIN: dict[str, tuple[str, str]] = {
    "lumen": ("lumen_train.jsonl", "lumen_eval.jsonl"),
    # the same manual's questions as preference pairs (prompt/chosen/rejected) for dpo and orpo
    "lumen_pref": ("lumen_pref_train.jsonl", "lumen_pref_eval.jsonl"),
}


def is_builtin(source: str) -> bool:
    return source.startswith(PREFIX)


def builtin_file(source: str, split: str | None = None) -> Traversable:
    """The embedded file for 'builtin:<name>'; split 'train' (default) or 'eval'/'test'/'validation'."""
    name = source[len(PREFIX):]
    if name not in BUILTIN:
        raise DataError(f"unknown built-in dataset '{source}' (known: "
                        f"{', '.join(PREFIX + n for n in sorted(BUILTIN))})")
    train, held_out = BUILTIN[name]
    if split in (None, "train"):
        filename = train
    elif split in ("eval", "test", "validation"):
        filename = held_out
    else:
        raise DataError(f"built-in dataset '{source}' has the splits train and eval, not '{split}'")
    resource = files("fasttune") / "assets" / filename
    if not resource.is_file():
        raise DataError(f"built-in dataset file {filename} is missing from the installed package")
    return resource
