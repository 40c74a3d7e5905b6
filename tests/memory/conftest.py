"""The memory tests build the model tests' tiny models (tests/models/model_cases.py), one per family where a
test takes `family_case`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "models"))
from model_cases import FAMILY_CASES  # noqa: E402  (found through the path above)


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking `family` runs once per entry of FAMILY_CASES."""
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", list(FAMILY_CASES))


@pytest.fixture
def family_case(family: str) -> dict:
    """The LlamaConfig overrides of the parametrized `family`."""
    return FAMILY_CASES[family]
