"""`view`: a file with line numbers (optionally a line range), or a folder's listing.

Paths go through `Workspace.resolve` (no escapes through `..` or symlinks). A file view is also
the file's latest state for mid-term memory (`meta["file_state"]`).

A view is bounded in characters as well as lines: a line longer than `MAX_LINE_CHARS` is cut
(marked), and lines stop once the view would pass `max_chars` (`agent.max_output_chars`); the
note then says where to continue. Files over `MAX_VIEW_BYTES` are refused (use bash: head, grep)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lagoon.agent.tools import ToolArgumentError, ToolOutput, require_str
from lagoon.agent.workspace import Workspace
from lagoon.protocols import ToolSpec

__all__ = ["ViewTool", "numbered"]

MAX_VIEW_LINES = 400
MAX_LISTING = 200
MAX_LINE_CHARS = 2000
MAX_VIEW_BYTES = 64 * 1024 * 1024  # read whole (line numbers must match edit's splitlines)


def clip_line(line: str, limit: int = MAX_LINE_CHARS) -> str:
    """`line`, or its first `limit` characters with the rest counted."""
    if len(line) <= limit:
        return line
    return f"{line[:limit]} [... {len(line) - limit} more characters on this line]"


def numbered(lines: list[str], first: int, *, line_chars: int = MAX_LINE_CHARS) -> str:
    """Lines prefixed with right-aligned 1-based numbers starting at `first`; long lines clipped."""
    width = len(str(first + len(lines) - 1))
    return "\n".join(f"{i:>{width}}\t{clip_line(line, line_chars)}" for i, line in enumerate(lines, start=first))


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

    def __init__(self, workspace: Workspace, *, max_chars: int = 10000) -> None:
        self.workspace = workspace
        self.max_chars = max_chars

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
        size = path.stat().st_size
        if size > MAX_VIEW_BYTES:
            return ToolOutput(text=f"{rel} is {size} bytes, too large to view; use bash (head, sed -n, grep)",
                              ok=False)
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
        header = f"{rel}:\n"
        # room for the header and the longest note; a line never takes more than half of it
        room = self.max_chars - len(header) - 120
        line_chars = max(min(MAX_LINE_CHARS, room // 2), 40)
        width = len(str(end))
        rows: list[str] = []
        used = 0
        for i in range(start, end + 1):
            row = f"{i:>{width}}\t{clip_line(lines[i - 1], line_chars)}"
            if rows and used + len(row) + 1 > room:
                break
            rows.append(row)
            used += len(row) + 1
        shown_end = start + len(rows) - 1 if rows else end
        note = ""
        if shown_end < end:
            note = (f"\n[lines {start}-{shown_end} of {len(lines)}; the view is capped at {self.max_chars} "
                    f"characters: continue with start_line={shown_end + 1}]")
        elif (start, end) != (1, len(lines)):
            note = f"\n[lines {start}-{end} of {len(lines)}]"
        text = header + "\n".join(rows) + note
        return ToolOutput(text=text, files=(rel,), meta={"file_state": text})


def _int(value: Any, default: int, name: str) -> int:
    if value is None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ToolArgumentError(f"view: {name} must be an integer, got {value!r}") from None
