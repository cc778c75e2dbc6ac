"""Engines built here decode eagerly unless a test sets `engine.compile`: compiling each tiny engine's
decode step would cost seconds (the compiled path is tested in tests/engine/test_compile.py)."""

import os

os.environ.setdefault("LAGOON_COMPILE", "0")
