"""A human check of what will be trained: each example decoded with its trained tokens marked."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fasttune.models.base import IGNORE_INDEX

GREEN, RESET = "\033[32m", "\033[0m"
OPEN, CLOSE = "«", "»"


def _spans(input_ids: Sequence[int], labels: Sequence[int]) -> list[tuple[bool, list[int]]]:
    """Consecutive runs of (trained?, ids)."""
    runs: list[tuple[bool, list[int]]] = []
    for tok, lab in zip(input_ids, labels):
        trained = lab != IGNORE_INDEX
        if runs and runs[-1][0] == trained:
            runs[-1][1].append(tok)
        else:
            runs.append((trained, [tok]))
    return runs


def render_example(example: Any, tokenizer: Any, color: bool) -> str:
    """The example's text; trained spans in green (color) or between « and » (plain)."""
    parts = []
    for trained, ids in _spans(example.input_ids, example.labels):
        text = tokenizer.decode(ids, skip_special_tokens=False)
        if trained:
            text = f"{GREEN}{text}{RESET}" if color else f"{OPEN}{text}{CLOSE}"
        parts.append(text)
    return "".join(parts)


def preview_rows(examples: Sequence[Any], tokenizer: Any, n: int = 3, color: bool = False,
                 summary: Any = None) -> str:
    """The first `n` examples rendered with trained tokens marked, then the summary if given."""
    legend = "trained tokens in green" if color else f"trained tokens between {OPEN} and {CLOSE}"
    out = [f"showing {min(n, len(examples))} of {len(examples)} examples; {legend}"]
    for k, ex in enumerate(examples[:n]):
        trained = sum(1 for x in ex.labels if x != IGNORE_INDEX)
        where = f"row {ex.row}" if getattr(ex, "row", None) is not None else f"example {k + 1}"
        out.append(f"── {where}: {len(ex.input_ids)} tokens, {trained} trained ──")
        out.append(render_example(ex, tokenizer, color))
    if summary is not None:
        out.append("")
        out.append(str(summary))
    return "\n".join(out)


def preview_method_rows(examples: Sequence[Any], tokenizer: Any, n: int = 3, color: bool = False,
                        summary: Any = None) -> str:
    """The first `n` rows of a dpo/orpo/kto/grpo dataset: each pair's chosen and rejected sequence, each KTO
    row with its label, each GRPO prompt, trained tokens marked as in `preview_rows`."""
    legend = "trained tokens in green" if color else f"trained tokens between {OPEN} and {CLOSE}"
    out = [f"showing {min(n, len(examples))} of {len(examples)} rows; {legend}"]
    for k, ex in enumerate(examples[:n]):
        where = f"row {ex.row}" if getattr(ex, "row", None) is not None else f"row {k + 1}"
        if hasattr(ex, "prompt_ids"):  # grpo: a prompt, completions are sampled
            out.append(f"── {where}: prompt of {len(ex.prompt_ids)} tokens (completions are sampled) ──")
            out.append(tokenizer.decode(ex.prompt_ids, skip_special_tokens=False))
            continue
        parts = ((("chosen", ex.chosen), ("rejected", ex.rejected)) if hasattr(ex, "chosen")
                 else ((("desirable" if ex.label else "undesirable"), ex.example),))
        for name, seq in parts:
            trained = sum(1 for x in seq.labels if x != IGNORE_INDEX)
            out.append(f"── {where}, {name}: {len(seq.input_ids)} tokens, {trained} trained ──")
            out.append(render_example(seq, tokenizer, color))
    if summary is not None:
        out.append("")
        out.append(str(summary))
    return "\n".join(out)
