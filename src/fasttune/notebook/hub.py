"""Unsloth's saving and Hub methods of a notebook model, on fasttune's exports and `fasttune.hub`:
save_pretrained_merged / push_to_hub_merged, save_pretrained_gguf / push_to_hub_gguf, push_to_hub.

Each first saves the adapter (and the tokenizer given) to a temporary directory, then runs the same export
as the CLI (`export.merge.merge`, `export.gguf.export_gguf`) with the model's own base, writes the model
card, and for the push_* methods uploads the result with `hub.push_path`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Unsloth's save_method values that fasttune writes
SAVE_METHODS = ("merged_16bit", "lora")


@contextmanager
def _saved_adapter(model: Any, tokenizer: Any) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="fasttune-adapter-") as tmp:
        adapter = Path(tmp) / "adapter"
        model.save_pretrained(adapter)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(adapter))
        yield adapter


def _merged_dtype(model: Any) -> str:
    """merged_16bit: the model's own 16-bit dtype, bf16 for a model computing in fp32."""
    import torch

    return "fp16" if model.dtype == torch.float16 else "bf16"


def save_pretrained_merged(model: Any, save_directory: str | Path, tokenizer: Any = None,
                           save_method: str = "merged_16bit") -> Path:
    """The adapter merged into its base as a 16-bit transformers checkpoint (or, with save_method='lora',
    the adapter alone), with its model card."""
    from fasttune.export.merge import merge
    from fasttune.model_card import write_card

    if save_method not in SAVE_METHODS:
        raise ValueError(f"save_pretrained_merged: save_method={save_method!r} is not supported (use "
                         f"{' or '.join(SAVE_METHODS)}; a 4-bit merge would requantise the merged weights)")
    out = Path(save_directory)
    if save_method == "lora":
        with _saved_adapter(model, tokenizer) as adapter:
            model.save_pretrained(out)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(out))
            write_card(out, "adapter", adapter)
        return out
    with _saved_adapter(model, tokenizer) as adapter:
        merge(adapter, out, dtype=_merged_dtype(model), base=model.model_config.model_name)
        write_card(out, "merged", adapter)
    return out


def save_pretrained_gguf(model: Any, save_directory: str | Path, tokenizer: Any = None,
                         quantization_method: str = "q8_0") -> Path:
    """`save_directory/model-<quantization_method>.gguf` and its card `model-<...>.README.md`; returns the
    GGUF path."""
    from fasttune.export.gguf import export_gguf
    from fasttune.hub import gguf_card_path
    from fasttune.model_card import write_card

    out_dir = Path(save_directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    gguf = out_dir / f"model-{quantization_method}.gguf"
    with _saved_adapter(model, tokenizer) as adapter:
        export_gguf(adapter, gguf, type=quantization_method, base=model.model_config.model_name)
        write_card(gguf_card_path(gguf), "gguf", adapter, gguf_name=gguf.name)
    return gguf


def push_to_hub(model: Any, repo_id: str, tokenizer: Any = None, *, token: str | None = None,
                private: bool | None = None, commit_message: str | None = None,
                revision: str | None = None) -> str:
    """Upload the adapter (and the tokenizer given) with a card for `repo_id`; returns the commit URL."""
    from fasttune.hub import push_path

    with _saved_adapter(model, tokenizer) as adapter:
        return push_path(adapter, repo_id, token=token, private=private, commit_message=commit_message,
                         revision=revision)


def push_to_hub_merged(model: Any, repo_id: str, tokenizer: Any = None, save_method: str = "merged_16bit",
                       *, token: str | None = None, private: bool | None = None,
                       commit_message: str | None = None, revision: str | None = None) -> str:
    from fasttune.hub import push_path

    with tempfile.TemporaryDirectory(prefix="fasttune-merged-") as tmp:
        out = save_pretrained_merged(model, Path(tmp) / "merged", tokenizer, save_method)
        return push_path(out, repo_id, token=token, private=private, commit_message=commit_message,
                         revision=revision)


def push_to_hub_gguf(model: Any, repo_id: str, tokenizer: Any = None, quantization_method: str = "q8_0", *,
                     token: str | None = None, private: bool | None = None,
                     commit_message: str | None = None, revision: str | None = None) -> str:
    from fasttune.hub import push_path

    with tempfile.TemporaryDirectory(prefix="fasttune-gguf-") as tmp:
        gguf = save_pretrained_gguf(model, tmp, tokenizer, quantization_method)
        return push_path(gguf, repo_id, token=token, private=private, commit_message=commit_message,
                         revision=revision)
