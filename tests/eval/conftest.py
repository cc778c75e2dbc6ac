"""Shared fixtures of the eval tests: the starter suite path and a private mirror cache."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
STARTER = ROOT / "examples" / "suites" / "starter"


@pytest.fixture(autouse=True, scope="session")
def _mirror_cache(tmp_path_factory):
    """SWE-bench mirrors are built into a temporary cache, never the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("LAGOON_CACHE_DIR", str(tmp_path_factory.mktemp("lagoon-cache")))
    yield
    mp.undo()


@pytest.fixture
def starter() -> Path:
    return STARTER
