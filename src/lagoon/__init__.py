"""Lagoon: a sparse-MoE coding model engine, a context-engineered coding agent, hybrid routing
and task-suite evaluation.

The names below are the public API; anything else is internal. Torch-backed parts
(`lagoon.moe`, `lagoon.engine`, `lagoon.quant`) are imported from their packages, so importing
`lagoon` itself stays light.
"""

# ruff: noqa: E402 - the imports below come after gc.freeze() on purpose
import gc
from importlib.metadata import PackageNotFoundError, version

# Everything alive now (torch's ~1M objects when the caller imported torch first, as the engine's users
# do) is moved out of the collector's reach: the imports below (pydantic's config classes, the engine)
# otherwise pay full collections that rescan torch (~0.25 s of CPU of a warm start). Those objects are
# module-level state that lives as long as the process anyway.
gc.freeze()

from lagoon import errors as _errors
from lagoon.config import LagoonConfig, load_config
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
from lagoon.telemetry import Telemetry

try:
    __version__ = version("lagoon-agent")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0"

__all__ = [
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
