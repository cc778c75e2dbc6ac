"""`edit`: exact `str_replace`, `create`, `insert` and `undo` on files inside the workspace.

- `str_replace` needs `old_str` to occur exactly once; a miss or an ambiguous match changes nothing
  and says why (with the line numbers of every match when ambiguous).
- `create` refuses an existing file (use `str_replace`); `insert` puts text after line N (0 = top).
- `undo` restores the file as it was before the last edit of that path (deleting a created file).

Writes are atomic (temp file + rename, mode kept). Before the first edit of a path the tool takes
the session's advisory lock on it (`locks.acquire`), so two sessions never edit one file at once.
The undo history is part of the tool state the session persists (last `MAX_UNDO` per path). A file
over `MAX_UNDO_CHARS` gets no undo copy (ten of them would flood memory and the session store): its
history is dropped and the edit's reply says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lagoon.agent.tools import ToolArgumentError, ToolOutput, require_str
from lagoon.agent.tools.view import numbered
from lagoon.agent.workspace import Workspace
from lagoon.atomic import write_atomic
from lagoon.protocols import LockKeeper, ToolSpec

__all__ = ["EditTool", "LockKeeper"]

MAX_UNDO = 10
SNIPPET_CONTEXT = 3
SNIPPET_LINE_CHARS = 500  # 7 lines of at most this: a snippet never floods the prompt
MAX_MATCH_LINES = 20
MAX_UNDO_CHARS = 1_000_000


class EditTool:
    name = "edit"
    spec = ToolSpec(
        name="edit",
        description=(
            "Edit a file. command=str_replace replaces old_str (which must occur exactly once) with new_str; "
            "command=create writes a new file with file_text; command=insert puts new_str after line "
            "insert_line (0 = top); command=undo reverts the last edit of path."
        ),
        parameters={
            "type": "object",
            "properties": {
                "command": {"type": "string", "enum": ["str_replace", "create", "insert", "undo"]},
                "path": {"type": "string", "description": "Path relative to the repository root."},
                "old_str": {"type": "string"},
                "new_str": {"type": "string"},
                "file_text": {"type": "string"},
                "insert_line": {"type": "integer"},
            },
            "required": ["command", "path"],
        },
    )

    def __init__(self, workspace: Workspace, locks: LockKeeper | None = None) -> None:
        self.workspace = workspace
        self.locks = locks
        self.history: dict[str, list[str | None]] = {}

    def run(self, arguments: Mapping[str, Any]) -> ToolOutput:
        command = require_str(arguments, "command", self.name)
        path = self.workspace.resolve(require_str(arguments, "path", self.name))
        rel = self.workspace.relative(path)
        handlers = {"str_replace": self._replace, "create": self._create, "insert": self._insert, "undo": self._undo}
        handler = handlers.get(command)
        if handler is None:
            raise ToolArgumentError(f"edit: unknown command {command!r}; use one of {', '.join(handlers)}")
        if path.is_dir():
            raise ToolArgumentError(f"edit: {rel} is a folder; give a file path")
        if self.locks is not None:
            self.locks.acquire(rel)
        return handler(path, rel, arguments)

    def _read(self, path: Path, rel: str) -> str:
        if not path.is_file():
            raise ToolArgumentError(f"edit: {rel} does not exist; use command=create to make it")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ToolArgumentError(f"edit: {rel} is not UTF-8 text and cannot be edited here") from None

    def _commit(self, path: Path, rel: str, before: str | None, after: str, around: int) -> ToolOutput:
        write_atomic(path, after, keep_mode=True)
        note = ""
        if before is not None and len(before) > MAX_UNDO_CHARS:
            # an older copy would now undo two edits at once: forget them all
            self.history.pop(rel, None)
            note = f" (no undo kept: the file has over {MAX_UNDO_CHARS} characters; use git to revert)"
        else:
            stack = self.history.setdefault(rel, [])
            stack.append(before)
            del stack[:-MAX_UNDO]
        lines = after.splitlines()
        lo = max(0, around - SNIPPET_CONTEXT)
        hi = min(len(lines), around + SNIPPET_CONTEXT + 1)
        snippet = numbered(lines[lo:hi], lo + 1, line_chars=SNIPPET_LINE_CHARS)
        text = f"edited {rel}{note}; lines {lo + 1}-{hi} now read:\n{snippet}"
        return ToolOutput(text=text, files=(rel,), meta={"file_state": text, "edit": True})

    def _replace(self, path: Path, rel: str, arguments: Mapping[str, Any]) -> ToolOutput:
        old = require_str(arguments, "old_str", self.name)
        new = arguments.get("new_str", "")
        if not isinstance(new, str):
            raise ToolArgumentError("edit: new_str must be a string")
        if not old:
            raise ToolArgumentError("edit: old_str is empty; give the exact text to replace")
        text = self._read(path, rel)
        count = text.count(old)
        if count == 0:
            return ToolOutput(
                text=f"error: old_str was not found in {rel}; nothing changed. View the file and copy the "
                "exact text, including whitespace and indentation.",
                ok=False,
            )
        if count > 1:
            starts, pos = [], text.find(old)
            while pos != -1 and len(starts) < MAX_MATCH_LINES:
                starts.append(text.count("\n", 0, pos) + 1)
                pos = text.find(old, pos + 1)
            more = ", …" if count > len(starts) else ""
            return ToolOutput(
                text=f"error: old_str occurs {count} times in {rel} (lines {', '.join(map(str, starts))}{more}); "
                "nothing changed. Include more surrounding lines so it matches exactly once.",
                ok=False,
            )
        at = text.count("\n", 0, text.find(old))
        return self._commit(path, rel, text, text.replace(old, new, 1), at)

    def _create(self, path: Path, rel: str, arguments: Mapping[str, Any]) -> ToolOutput:
        body = require_str(arguments, "file_text", self.name)
        if path.exists():
            return ToolOutput(text=f"error: {rel} already exists; use command=str_replace to change it", ok=False)
        return self._commit(path, rel, None, body, 0)

    def _insert(self, path: Path, rel: str, arguments: Mapping[str, Any]) -> ToolOutput:
        new = require_str(arguments, "new_str", self.name)
        text = self._read(path, rel)
        lines = text.splitlines(keepends=True)
        try:
            line = int(arguments.get("insert_line"))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raise ToolArgumentError("edit: insert_line (an integer, 0 = top) is required for insert") from None
        if not 0 <= line <= len(lines):
            raise ToolArgumentError(f"edit: insert_line {line} is outside 0..{len(lines)} for {rel}")
        if lines and not lines[-1].endswith("\n") and line == len(lines):
            lines[-1] += "\n"
        block = new if new.endswith("\n") else new + "\n"
        after = "".join(lines[:line]) + block + "".join(lines[line:])
        return self._commit(path, rel, text, after, line)

    def _undo(self, path: Path, rel: str, arguments: Mapping[str, Any]) -> ToolOutput:
        stack = self.history.get(rel)
        if not stack:
            return ToolOutput(text=f"error: no edit of {rel} to undo", ok=False)
        before = stack.pop()
        if before is None:
            path.unlink(missing_ok=True)
            return ToolOutput(text=f"undid the creation of {rel} (file removed)", files=(rel,), meta={"edit": True})
        write_atomic(path, before, keep_mode=True)
        return ToolOutput(text=f"reverted {rel} to its state before the last edit", files=(rel,), meta={"edit": True})

    def state(self) -> dict[str, Any]:
        return {"history": {k: v for k, v in self.history.items() if v}}

    def restore(self, state: Mapping[str, Any]) -> None:
        self.history = {str(k): list(v) for k, v in dict(state.get("history", {})).items()}
