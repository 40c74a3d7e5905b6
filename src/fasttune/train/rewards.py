"""GRPO's reward functions: user callables (or `module:function` from the CLI) and the built-in ones, called
as TRL calls them, with errors that name the function and the row.

A reward function takes keyword lists, one entry per completion: `prompts`, `completions` (text; for a
conversational prompt a list with one assistant message), `completion_ids`, and every other column of the
dataset (e.g. `answer`); it returns one float per completion, or None where it does not apply.
Built-ins: `exact_match` (1.0 where the completion, stripped, equals the `answer` column, else 0.0) and
`regex:PATTERN` (1.0 where the completion matches PATTERN from its start, `re.fullmatch` with DOTALL).
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

from fasttune.config import ConfigError

RewardFunc = Callable[..., Sequence[float | None]]


class RewardError(ValueError):
    """A reward function failed or returned something unusable; the message names it and the row."""


def _text(completion: Any) -> str:
    return completion[-1]["content"] if isinstance(completion, list) else completion


def exact_match(completions: Sequence[Any], answer: Sequence[Any], **_: Any) -> list[float]:
    """1.0 where the completion, without surrounding whitespace, is exactly the `answer` column's value."""
    return [float(_text(c).strip() == str(a).strip()) for c, a in zip(completions, answer)]


def regex_reward(pattern: str) -> RewardFunc:
    """1.0 where the whole completion matches `pattern` (DOTALL: '.' spans lines), else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def regex_format(completions: Sequence[Any], **_: Any) -> list[float]:
        return [float(compiled.fullmatch(_text(c).strip()) is not None) for c in completions]

    regex_format.__name__ = f"regex:{pattern}"
    return regex_format


def resolve_reward(spec: str | RewardFunc) -> RewardFunc:
    """A callable as it is; 'exact_match', 'regex:PATTERN' or 'module:function' by name."""
    if callable(spec):
        return spec
    if spec == "exact_match":
        return exact_match
    if spec.startswith("regex:"):
        try:
            return regex_reward(spec[len("regex:"):])
        except re.error as e:
            raise ConfigError(f"reward '{spec}': not a valid regular expression ({e})") from None
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ConfigError(f"reward '{spec}': expected module:function, exact_match or regex:PATTERN")
    try:
        func = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward '{spec}': cannot import it ({e})") from None
    if not callable(func):
        raise ConfigError(f"reward '{spec}': {module}.{name} is not callable")
    return func


def reward_name(func: RewardFunc) -> str:
    return getattr(func, "__name__", type(func).__name__)


def _check(values: Any, name: str, rows: Sequence[int | None], n: int) -> list[float]:
    if not isinstance(values, Sequence) or len(values) != n:
        size = len(values) if isinstance(values, Sequence) else type(values).__name__
        raise RewardError(f"reward function '{name}' returned {size} values for {n} completions "
                          "(one float, or None, per completion)")
    out = []
    for value, row in zip(values, rows):
        if value is None:
            out.append(math.nan)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append(float(value))
        else:
            raise RewardError(f"reward function '{name}' returned {value!r} for row {row}: expected a number "
                              "or None")
    return out


def call_reward(func: RewardFunc, rows: Sequence[int | None], columns: dict[str, list[Any]]) -> list[float]:
    """The function's rewards for the completions; `rows` are their dataset rows, for errors.

    When the call raises, each completion is tried alone to find the row it fails on."""
    name, n = reward_name(func), len(rows)
    try:
        return _check(func(**columns), name, rows, n)
    except RewardError:
        raise
    except Exception as batch_error:
        for i, row in enumerate(rows):
            try:
                func(**{k: v[i:i + 1] for k, v in columns.items()})
            except Exception as e:
                raise RewardError(f"reward function '{name}' raised {type(e).__name__} on row {row}: "
                                  f"{e}") from e
        raise RewardError(f"reward function '{name}' raised {type(batch_error).__name__} on rows "
                          f"{sorted(set(r for r in rows if r is not None))}: {batch_error}") from batch_error
