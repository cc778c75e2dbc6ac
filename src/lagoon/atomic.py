"""Atomic file writes: a reader sees the old file or the new one, never half of either.

Every file Lagoon writes that something else reads (trajectories, eval results and reports,
placement plans, classifiers, expert stores, edited source files, index manifests) goes through
`atomic_path` — a temporary file beside the target, renamed over it only when the writer finished
without an error (and removed otherwise). `write_atomic` and `write_json_atomic` cover the common
cases. The rename is atomic on POSIX within one filesystem, which is why the temporary file lives in
the target's folder. Not a durability guarantee against power loss (no fsync of the folder).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = ["atomic_path", "write_atomic", "write_json_atomic"]


@contextmanager
def atomic_path(path: str | os.PathLike[str], *, keep_mode: bool = False, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a temporary path beside `path` to write; it replaces `path` when the block ends cleanly.

    `keep_mode` gives the new file the old one's permission bits (an edited script stays executable).
    `suffix` lets a library that picks the format by extension (savefig, safetensors) see the right one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    mode = target.stat().st_mode & 0o7777 if keep_mode and target.exists() else None
    fd, name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike[str], data: str | bytes, *, keep_mode: bool = False) -> None:
    """Write text (UTF-8, newlines kept as given) or bytes to `path` atomically."""
    with atomic_path(path, keep_mode=keep_mode) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(data)


def write_json_atomic(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2, **dumps: Any) -> None:
    """`json.dumps(obj)` (plus a final newline) to `path` atomically; extra keywords go to json.dumps."""
    write_atomic(path, json.dumps(obj, indent=indent, **dumps) + "\n")
