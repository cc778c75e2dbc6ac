"""Suite-wide: the daily stats store (`lagoon.stats`, default under $XDG_STATE_HOME) is a temporary
folder per test, so no test writes to the user's state directory or sees another test's figures."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _private_state_home(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("state")))

