"""The agent's tools and the `ToolBox` that offers them to the model and runs its calls.

Registry (short name → class): `bash`, `view`, `edit`, `search`, `submit`, `assume`, `verify`. A tool has a
`ToolSpec` (name, description, JSON-schema parameters) and `run(arguments) -> ToolOutput`. Bad
arguments raise `ToolArgumentError`, which the box turns into an error observation the model can
read and correct; an unknown tool name is the loop's `FormatError`, not a tool's.

Tools carry state (cwd/env for bash, undo history for edit) through `state()` / `restore()` so the
session can persist it.

Every result leaves the box capped: its text and every string in its `meta` (a view's
`file_state` repeats the text) are cut to `max_chars` (`agent.max_output_chars`) as head and tail.
What leaves the box is what reaches the session store, the trajectory, exports and the prompt, so
no tool can flood them whatever it read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from lagoon.agent.environment import cut_output
from lagoon.errors import WorkspaceError
from lagoon.protocols import Tool, ToolSpec

__all__ = ["Tool", "ToolBox", "ToolOutput", "ToolArgumentError", "UnknownToolError", "TOOL_NAMES"]

TOOL_NAMES = ("bash", "view", "edit", "search", "submit", "assume", "verify")


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


def require_str(arguments: Mapping[str, Any], key: str, tool: str) -> str:
    value = arguments.get(key)
    if not isinstance(value, str):
        raise ToolArgumentError(f"{tool}: argument {key!r} (a string) is required")
    return value


class ToolBox:
    """The tools one run offers, by name; results capped at `max_chars` characters per string."""

    def __init__(self, tools: Sequence[Tool], *, max_chars: int = 10000,
                 offered: Callable[[str], bool] | None = None) -> None:
        self.tools = {t.name: t for t in tools}
        self.max_chars = max_chars
        self.offered = offered
        """Which tools the next call offers (default all): `verify` waits for an assumption to verify.
        A tool not offered still runs if called (a resumed reply may name it)."""

    def specs(self) -> list[ToolSpec]:
        return [t.spec for t in self.tools.values() if self.offered is None or self.offered(t.name)]

    def run(self, name: str, arguments: Mapping[str, Any]) -> ToolOutput:
        tool = self.tools.get(name)
        if tool is None:
            raise UnknownToolError(
                f"unknown tool {name!r}; the tools are: {', '.join(self.tools)}"
            )
        try:
            _check_encodable(arguments)
            out = tool.run(arguments)
        except (ToolArgumentError, WorkspaceError) as exc:
            out = ToolOutput(text=f"error: {exc}", ok=False)
        except OSError as exc:  # permission denied, disk full …: the model can react to it
            out = ToolOutput(text=f"error: {name} failed: {exc.strerror or exc} ({exc.filename or ''})", ok=False)
        return self.cap(out)

    def cap(self, out: ToolOutput) -> ToolOutput:
        """`out` with its text and every string in its meta within `max_chars`."""
        text, cut = cut_output(out.text, self.max_chars)
        meta = _cap_value(dict(out.meta), self.max_chars)
        if not cut and meta == out.meta:
            return out
        return replace(out, text=text, meta=meta)

    def state(self) -> dict[str, Any]:
        return {n: t.state() for n, t in self.tools.items() if hasattr(t, "state")}

    def restore(self, state: Mapping[str, Any]) -> None:
        for name, sub in state.items():
            tool = self.tools.get(name)
            if tool is not None and hasattr(tool, "restore"):
                tool.restore(sub)


def _cap_value(value: Any, limit: int) -> Any:
    if isinstance(value, str):
        return cut_output(value, limit)[0]
    if isinstance(value, Mapping):
        return {k: _cap_value(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cap_value(v, limit) for v in value)
    return value


def _check_encodable(value: Any, where: str = "") -> None:
    """A JSON reply can carry a lone surrogate ("\\ud800") that no file, path or command can hold."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ToolArgumentError(
                f"argument {where or 'value'!r} holds text that is not valid Unicode (a lone surrogate); resend it"
            ) from None
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_encodable(v, str(k))
    elif isinstance(value, list | tuple):
        for v in value:
            _check_encodable(v, where)
