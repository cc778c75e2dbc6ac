"""Reading JSON Lines files: one JSON object per line, blank lines skipped.

`read_jsonl(path, error=ConfigError)` yields `(where, obj)` — `where` is `"path:line"` for messages —
and raises `error` naming the line and the fix for a line that is not a JSON object (or, given an
`errors` list, appends it there and reads on, for loaders that report every bad line at once). With
`torn_ok=True` it instead skips bad lines and reports how many through `JsonlRead.bad` (a file
appended to by a process that was killed mid-write ends in a torn line; eval results recover that
way). Appending lives with the writer that owns the file (it fsyncs as it needs), not here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lagoon.errors import ConfigError, LagoonError

__all__ = ["read_jsonl", "JsonlRead"]


@dataclass
class JsonlRead:
    """What a tolerant read skipped: `bad` lines that were not JSON objects, `torn` when the file
    did not end with a newline."""

    bad: int = 0
    torn: bool = False


def read_jsonl(
    path: str | os.PathLike[str],
    *,
    error: type[LagoonError] = ConfigError,
    torn_ok: bool = False,
    stats: JsonlRead | None = None,
    errors: list[Any] | None = None,
) -> Iterator[tuple[str, dict[str, Any]]]:
    """`(where, obj)` for each JSON object line of `path`; `error` (or, with `torn_ok`, a skip counted
    in `stats`) for a line that is not one."""
    p = Path(path)
    raw = p.read_bytes()
    if stats is not None:
        stats.torn = bool(raw) and not raw.endswith(b"\n")
    for n, line in enumerate(raw.decode("utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{p}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            if torn_ok:
                if stats is not None:
                    stats.bad += 1
                continue
            problem = error(f"{where}: not JSON ({exc.msg}); write one JSON object per line")
        else:
            if isinstance(obj, dict):
                yield where, obj
                continue
            if torn_ok:
                if stats is not None:
                    stats.bad += 1
                continue
            problem = error(f"{where}: expected a JSON object per line, got {type(obj).__name__}")
        if errors is None:
            raise problem
        errors.append(problem)
