"""`cache_root()`: the one folder where Lagoon keeps what it can rebuild but would rather not —
compiled decode steps (``compile/``), repacked GGUF weights (``gguf/``), built native kernels (``kernels/``), converted tokenizers
(``tokenizers/``), moefied models (``models/``), SWE-bench mirrors (``mirrors/``).

``LAGOON_CACHE_DIR`` moves it (default ``~/.cache/lagoon``); ``LAGOON_CACHE``, the name some parts
read before, is honoured as an alias when ``LAGOON_CACHE_DIR`` is unset. Everything under it may be
deleted at any time: the next start rebuilds it. This module creates nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "CACHE_ENV", "CACHE_ENV_ALIAS"]

CACHE_ENV = "LAGOON_CACHE_DIR"
CACHE_ENV_ALIAS = "LAGOON_CACHE"


def cache_root() -> Path:
    """``$LAGOON_CACHE_DIR``, else ``$LAGOON_CACHE``, else ``~/.cache/lagoon``."""
    env = os.environ.get(CACHE_ENV) or os.environ.get(CACHE_ENV_ALIAS)
    return Path(env) if env else Path.home() / ".cache" / "lagoon"
