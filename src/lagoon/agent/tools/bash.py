"""`bash`: run one shell command in the environment (local or sandboxed) and report its exit code."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lagoon.agent.tools import ToolOutput, require_str
from lagoon.protocols import Environment, ToolSpec

__all__ = ["BashTool"]


class BashTool:
    name = "bash"
    FOOTER_ROOM = 32
    """Characters the exit-code line adds; give the environment `max_output_chars` less this, so
    the ToolBox cap never cuts a command's output a second time."""
    spec = ToolSpec(
        name="bash",
        description=(
            "Run one shell command in the repository. Each call is a fresh process, but the working "
            "directory and exported variables carry over. Long output is cut to head and tail."
        ),
        parameters={
            "type": "object",
            "properties": {"command": {"type": "string", "description": "The bash command line."}},
            "required": ["command"],
        },
    )

    def __init__(self, environment: Environment, *, timeout_s: float | None = None) -> None:
        self.environment = environment
        self.timeout_s = timeout_s

    def run(self, arguments: Mapping[str, Any]) -> ToolOutput:
        command = require_str(arguments, "command", self.name)
        result = self.environment.execute(command, timeout_s=self.timeout_s)
        body = result.output if result.output.strip() else "(no output)"
        return ToolOutput(
            text=f"{body}\n[exit code {result.exit_code}]",
            ok=result.exit_code == 0,
            exit_code=result.exit_code,
            meta={"timed_out": result.timed_out, "truncated": result.truncated, "duration_s": result.duration_s},
        )

    def state(self) -> dict[str, Any]:
        state = getattr(self.environment, "state", None)
        return state() if callable(state) else {}

    def restore(self, state: Mapping[str, Any]) -> None:
        restore = getattr(self.environment, "restore", None)
        if callable(restore) and state:
            restore(dict(state))
