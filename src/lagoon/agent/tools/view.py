"""`view`: a file with line numbers (optionally a line range), or a folder's listing.

Paths go through `Workspace.resolve` (no escapes through `..` or symlinks). A file view is also
the file's latest state for mid-term memory (`meta["file_state"]`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lagoon.agent.tools import ToolArgumentError, ToolOutput, require_str
from lagoon.agent.workspace import Workspace
from lagoon.protocols import ToolSpec

__all__ = ["ViewTool", "numbered"]

MAX_VIEW_LINES = 400
MAX_LISTING = 200


def numbered(lines: list[str], first: int) -> str:
    """Lines prefixed with right-aligned 1-based numbers starting at `first`."""
    width = len(str(first + len(lines) - 1))
    return "\n".join(f"{i:>{width}}\t{line}" for i, line in enumerate(lines, start=first))


class ViewTool:
    name = "view"
    spec = ToolSpec(
        name="view",
        description=(
            f"Show a file with line numbers (at most {MAX_VIEW_LINES} lines per call; pass start_line and "
            "end_line for a range), or list a folder."
        ),
        parameters={
            "type": "object",
            "properties": {
                "path": {"type": "string", "description": "Path relative to the repository root."},
                "start_line": {"type": "integer", "description": "First line, 1-based (default 1)."},
                "end_line": {"type": "integer", "description": "Last line, inclusive (default: end)."},
            },
            "required": ["path"],
        },
    )

    def __init__(self, workspace: Workspace) -> None:
        self.workspace = workspace

    def run(self, arguments: Mapping[str, Any]) -> ToolOutput:
        path = self.workspace.resolve(require_str(arguments, "path", self.name))
        rel = self.workspace.relative(path)
        if path.is_dir():
            entries = sorted(p.name + ("/" if p.is_dir() else "") for p in path.iterdir()
                             if p != self.workspace.state_dir)
            more = f"\n[... {len(entries) - MAX_LISTING} more]" if len(entries) > MAX_LISTING else ""
            return ToolOutput(text=f"{rel}/\n" + "\n".join(entries[:MAX_LISTING]) + more)
        if not path.is_file():
            raise ToolArgumentError(f"view: {rel} does not exist; list its folder with view to find the name")
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError:
            return ToolOutput(text=f"{rel} is not UTF-8 text ({path.stat().st_size} bytes)", ok=False)
        start = _int(arguments.get("start_line"), 1, "start_line")
        end = _int(arguments.get("end_line"), len(lines), "end_line")
        if start < 1 or (lines and start > len(lines)) or end < start:
            raise ToolArgumentError(
                f"view: range {start}-{end} is invalid for {rel} ({len(lines)} lines); use 1 ≤ start ≤ end"
            )
        end = min(end, len(lines), start + MAX_VIEW_LINES - 1)
        body = numbered(lines[start - 1:end], start)
        note = f"\n[lines {start}-{end} of {len(lines)}]" if (start, end) != (1, len(lines)) else ""
        text = f"{rel}:\n{body}{note}"
        return ToolOutput(text=text, files=(rel,), meta={"file_state": text})


def _int(value: Any, default: int, name: str) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ToolArgumentError(f"view: {name} must be an integer, got {value!r}") from None
