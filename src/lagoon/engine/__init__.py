"""Lagoon's in-process inference engine: checkpoint → Transformer → KV cache → sampling → text.

    engine = load_model("embedded")            # or a HF folder, or a .gguf file
    for piece in engine.stream("def add(a, b):", engine.params(max_new_tokens=32)):
        print(piece, end="")

    done = engine.complete("A JSON user:", engine.params(max_new_tokens=64),
                           constraint=Constraint.json_schema({"type": "object"}))   # always valid JSON

The OpenAI-compatible HTTP layer is `lagoon.engine.server`.
"""

from __future__ import annotations

from lagoon.gc_pause import paused

# torch's ~1M long-lived objects are built with the collector paused, then frozen (`lagoon.gc_pause`):
# otherwise the full collections their growth triggers rescan them, 0.15-0.45 s of a warm start
with paused():
    import torch  # noqa: F401

    from lagoon.engine.engine import (
        EMBEDDED,
        Completion,
        Engine,
        embedded_gguf_path,
        engine_from_config,
        load_model,
    )
    from lagoon.engine.grammar import Constraint
    from lagoon.engine.sampling import SamplingParams

__all__ = [
    "Engine", "Completion", "load_model", "engine_from_config", "embedded_gguf_path", "EMBEDDED", "SamplingParams",
    "Constraint",
]
