"""Lagoon: a sparse-MoE coding model engine, a context-engineered coding agent, hybrid routing
and task-suite evaluation.

The names below are the public API; anything else is internal. Torch-backed parts
(`lagoon.moe`, `lagoon.engine`, `lagoon.quant`) are imported from their packages, so importing
`lagoon` itself stays light: the config, telemetry (prometheus_client) and `__version__`
(importlib.metadata) are imported on first use of their names (PEP 562), the errors and protocols now.
"""

import importlib
import typing

from lagoon.gc_pause import paused as _paused

# Imported with the collector paused, then frozen (`lagoon.gc_pause`): what is alive by then (torch's
# ~1M objects when the caller imported torch first) is module-level state that lives as long as the
# process; full collections would otherwise rescan it (~0.25 s of CPU of a warm start).
with _paused():
    from lagoon import errors as _errors
    from lagoon.errors import *  # noqa: F403  (the error tree: listed once, in errors.__all__)
    from lagoon.protocols import (
        ChatMessage,
        ChatModel,
        ChatResponse,
        Classification,
        Classifier,
        CommandResult,
        Environment,
        Retriever,
        SessionLog,
        TaskType,
        ToolCall,
        ToolSpec,
        Usage,
    )

if typing.TYPE_CHECKING:
    from lagoon.config import LagoonConfig, load_config
    from lagoon.telemetry import Telemetry

_LAZY = {"LagoonConfig": "lagoon.config", "load_config": "lagoon.config", "Telemetry": "lagoon.telemetry"}


def __getattr__(name: str) -> typing.Any:
    """The public names whose modules are heavier than `lagoon` itself, imported on first use."""
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("lagoon-agent")
        except PackageNotFoundError:  # running from a source tree without install
            value = "0.0.0"
    elif name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    else:
        raise AttributeError(f"module 'lagoon' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, "__version__"})


__all__ = [  # noqa: F405 - __version__ and the lazy names come from __getattr__
    "__version__",
    # config
    "LagoonConfig",
    "load_config",
    # protocols and values
    "ChatMessage",
    "ChatModel",
    "ChatResponse",
    "Classification",
    "Classifier",
    "CommandResult",
    "Environment",
    "Retriever",
    "SessionLog",
    "TaskType",
    "ToolCall",
    "ToolSpec",
    "Usage",
    # telemetry
    "Telemetry",
    # errors (every name of lagoon.errors.__all__)
    *_errors.__all__,
]
