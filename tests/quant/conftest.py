"""The quant tests' fixtures; their tiny model lives in quant_models."""

from __future__ import annotations

import pytest
from quant_models import TinyLM, tiny_lm


@pytest.fixture
def model() -> TinyLM:
    return tiny_lm()
