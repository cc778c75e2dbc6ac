"""The agent's tools and the `ToolBox` that offers them to the model and runs its calls.

Registry (short name → class): `bash`, `view`, `edit`, `search`, `submit`. A tool has a
`ToolSpec` (name, description, JSON-schema parameters) and `run(arguments) -> ToolOutput`. Bad
arguments raise `ToolArgumentError`, which the box turns into an error observation the model can
read and correct; an unknown tool name is the loop's `FormatError`, not a tool's.

Tools carry state (cwd/env for bash, undo history for edit) through `state()` / `restore()` so the
session can persist it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from lagoon.errors import WorkspaceError
from lagoon.protocols import ToolSpec

__all__ = ["Tool", "ToolBox", "ToolOutput", "ToolArgumentError", "UnknownToolError", "TOOL_NAMES"]

TOOL_NAMES = ("bash", "view", "edit", "search", "submit")


class ToolArgumentError(ValueError):
    """The call named a real tool with arguments it cannot use; the message says what to send."""


class UnknownToolError(KeyError):
    """The model asked for a tool that is not offered."""


@dataclass(frozen=True)
class ToolOutput:
    """What a tool call produced. `exit_code` is set for commands; `files` lists files touched."""

    text: str
    ok: bool = True
    exit_code: int | None = None
    submitted: bool = False
    files: tuple[str, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)


class Tool(Protocol):
    name: str
    spec: ToolSpec

    def run(self, arguments: Mapping[str, Any]) -> ToolOutput: ...


def require_str(arguments: Mapping[str, Any], key: str, tool: str) -> str:
    value = arguments.get(key)
    if not isinstance(value, str):
        raise ToolArgumentError(f"{tool}: argument {key!r} (a string) is required")
    return value


class ToolBox:
    """The tools one run offers, by name."""

    def __init__(self, tools: Sequence[Tool]) -> None:
        self.tools = {t.name: t for t in tools}

    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self.tools.values()]

    def run(self, name: str, arguments: Mapping[str, Any]) -> ToolOutput:
        tool = self.tools.get(name)
        if tool is None:
            raise UnknownToolError(
                f"unknown tool {name!r}; the tools are: {', '.join(self.tools)}"
            )
        try:
            return tool.run(arguments)
        except (ToolArgumentError, WorkspaceError) as exc:
            return ToolOutput(text=f"error: {exc}", ok=False)
        except OSError as exc:  # permission denied, disk full …: the model can react to it
            return ToolOutput(text=f"error: {name} failed: {exc.strerror or exc} ({exc.filename or ''})", ok=False)

    def state(self) -> dict[str, Any]:
        return {n: t.state() for n, t in self.tools.items() if hasattr(t, "state")}

    def restore(self, state: Mapping[str, Any]) -> None:
        for name, sub in state.items():
            tool = self.tools.get(name)
            if tool is not None and hasattr(tool, "restore"):
                tool.restore(sub)
