"""An eval split held out of the training data: `eval_dataset: split:0.05` or `val_set_size: 0.05`.

The held-out rows are the round(fraction x N) valid rows (at least one) whose row numbers hash lowest
(SHA-256 of the number), so the split is the same in every process and for every reader of the data,
and does not depend on max_rows (applied to the training part afterwards). A worked example: 10 valid
rows and split:0.2 hold out the 2 rows whose numbers hash lowest; the other 8 are trained on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

from fasttune.config import ConfigError

PREFIX = "split:"


def parse_split(value: str | None) -> float | None:
    """0.05 for 'split:0.05'; None for anything else; a fraction outside (0, 1) is a ConfigError."""
    if not isinstance(value, str) or not value.startswith(PREFIX):
        return None
    try:
        fraction = float(value[len(PREFIX):])
    except ValueError:
        raise ConfigError(f"eval_dataset {value!r}: expected split:FRACTION, e.g. split:0.05") from None
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"eval_dataset {value!r}: the fraction must be between 0 and 1")
    return fraction


def holdout_fraction(data_cfg: Any) -> float | None:
    """The share of the training data held out for eval, from eval_dataset 'split:F' or val_set_size."""
    from_eval = parse_split(data_cfg.eval_dataset)
    size = data_cfg.val_set_size
    if not size:
        return from_eval
    if not 0.0 < size < 1.0:
        raise ConfigError(f"val_set_size {size}: must be 0 (none) or a fraction between 0 and 1")
    if from_eval is not None and from_eval != size:
        raise ConfigError(f"val_set_size {size} and eval_dataset {data_cfg.eval_dataset} disagree; set one")
    if from_eval is None and data_cfg.eval_dataset not in ("auto", "none", "", None):
        raise ConfigError(f"val_set_size {size} and eval_dataset {data_cfg.eval_dataset} both name an eval "
                          "set; set one")
    return size


def held_out(numbers: Sequence[int], fraction: float) -> set[int]:
    """The row numbers of the eval part (module docstring); a split that leaves no training row is an
    error."""
    k = max(1, round(fraction * len(numbers)))
    if k >= len(numbers):
        raise ConfigError(f"split:{fraction:g} of {len(numbers)} rows leaves no row to train on")
    ranked = sorted(numbers, key=lambda n: hashlib.sha256(str(n).encode()).digest())
    return set(ranked[:k])
