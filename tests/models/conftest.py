"""Tiny model configurations for the model tests: 2 layers, hidden 64, a prime vocabulary, fp32 on the CPU."""

from __future__ import annotations

import pytest
from model_cases import FAMILY_CASES, TINY, make_config, make_model  # noqa: F401  (fixtures below use them)


@pytest.fixture
def tiny_config():
    """Factory: tiny_config(**overrides) -> LlamaConfig."""
    return make_config


@pytest.fixture
def tiny_model():
    """Factory: tiny_model(seed=0, use_kernels=False, **overrides) -> LlamaForCausalLM in eval mode."""
    return make_model


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test taking `family` runs once per entry of FAMILY_CASES."""
    if "family" in metafunc.fixturenames:
        metafunc.parametrize("family", list(FAMILY_CASES))


@pytest.fixture
def family_case(family: str) -> dict:
    """The LlamaConfig overrides of the parametrized `family`."""
    return FAMILY_CASES[family]
