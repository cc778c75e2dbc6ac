"""`lagoon.extras.require`: a missing optional package names the extra to install."""

import pytest

from lagoon.errors import MissingDependencyError
from lagoon.extras import EXTRAS, require


def test_a_missing_extra_names_the_pip_install(monkeypatch):
    monkeypatch.setattr("lagoon.extras.installed", lambda module: False)
    with pytest.raises(MissingDependencyError, match=r"pip install 'lagoon-agent\[ray\]'") as e:
        require("ray", "eval.executor=ray")
    assert e.value.extra == "ray" and "eval.executor=ray" in str(e.value)


def test_present_modules_import_and_in_package_ones_are_refused():
    assert require("fastapi", "lagoon serve").__name__ == "fastapi"
    with pytest.raises(ValueError, match="not 'lagoon.context'"):
        require("lagoon.context", "retrieval")
    with pytest.raises(ValueError, match="known: "):
        require("numpy", "x")


def test_every_extra_is_declared_in_pyproject():
    import tomllib
    from pathlib import Path

    declared = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert set(EXTRAS.values()) <= set(declared)
