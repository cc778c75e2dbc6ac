"""`ContextGate`: the agent never acts on stale context.

Before every model call the loop asks the gate to `check()`. The gate validates the current
snapshot with the injected `SnapshotManager` (`lagoon.context.ContextManager` in production; any
object with the same two methods in tests). A failed validation counts one failure; the gate then
re-retrieves and takes a new snapshot of the fresh chunks — the manager numbers it one past the
task's latest version — and validates that.
`validation.max_consecutive_validation_failures` failures in a row without a passing validation
end the check with `halt=True` (the loop raises `ValidationHalt`). A passing validation resets
the count.

Snapshots are keyed by the session id, so a resumed session continues its version numbers. The
reported `version` is the snapshot's own when it has one (else the gate counts). Without a manager
there is nothing to validate and every check passes; without a retriever the prompt carries no code.

Fast path (when given `file_hash`, the manager's own content hash): after a snapshot has passed one
full validation, a check that finds every source file's stat (mtime, ctime, size, inode) unchanged —
or, when it changed, the file's hash still equal to the one the snapshot captured — and the
snapshot younger than `fresh_for_s` (less a second) passes without asking the manager again: a
snapshot's assumptions and age are its only other reasons to fail, and those did not change. A
stat is trusted only once the file is older than `_RACY_S` (as git does with its index), so two
writes inside one timestamp tick are never missed. Anything else goes to the manager, whose
verdict stands. The context store's audit trail therefore records full validations only.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lagoon.agent.tools.search import render_chunks
from lagoon.protocols import ChunkLike, Retriever, SnapshotManager

__all__ = ["ContextGate", "GateResult", "context_file_hash"]

_RACY_S = 2.0  # a file touched this recently is hashed on every check: its stat may not show the next write


@dataclass
class GateResult:
    ok: bool
    version: int
    refreshed: bool = False
    halt: bool = False
    failures: list[dict[str, Any]] = field(default_factory=list)
    """Each failed validation during this check, in order: {reasons, consecutive, version}."""


class ContextGate:
    def __init__(
        self,
        task: str,
        *,
        task_id: str = "task",
        retriever: Retriever | None = None,
        manager: SnapshotManager | None = None,
        max_failures: int = 3,
        k: int | None = None,
        budget_tokens: int | None = None,
        root: str | os.PathLike[str] | None = None,
        file_hash: Callable[[str], str | None] | None = None,
        fresh_for_s: float = math.inf,
    ) -> None:
        self.task = task
        self.root = Path(root) if root is not None else None
        self.file_hash = file_hash if root is not None else None
        self.fresh_for_s = fresh_for_s
        self.full_validations = 0
        self._validated: Any = None  # the snapshot that last passed a full validation
        self._stats: dict[str, tuple[tuple[int, int, int, int], str | None]] = {}
        self.task_id = task_id
        self.retriever = retriever
        self.manager = manager
        self.max_failures = max_failures
        self.k = k
        self.budget_tokens = budget_tokens
        self.chunks: list[ChunkLike] = []
        self.snapshot: Any = None
        self.version = 0
        self.consecutive_failures = 0

    def _retrieve(self) -> list[ChunkLike]:
        if self.retriever is None:
            return []
        return list(self.retriever.retrieve(self.task, k=self.k, budget_tokens=self.budget_tokens))

    def _snapshot(self) -> None:
        self.chunks = self._retrieve()
        self.version += 1
        if self.manager is not None:
            self.snapshot = self.manager.create_snapshot(self.task_id, self.chunks)
            self.version = int(getattr(self.snapshot, "version", self.version))
            mark_consumed = getattr(self.manager, "mark_consumed", None)  # starts the chunks' TTL clock
            if callable(mark_consumed) and self.chunks:
                mark_consumed(self.chunks, self.task_id)

    def start(self, last_version: int = 0) -> int:
        """Retrieve and take the first snapshot (or, on resume, the one after `last_version`)."""
        self.version = last_version
        self._snapshot()
        return self.version

    def check(self) -> GateResult:
        result = GateResult(ok=True, version=self.version)
        if self.manager is None:
            return result
        if self._unchanged_since_validated():
            self.consecutive_failures = 0
            return result
        while True:
            self.full_validations += 1
            report = self.manager.validate(self.snapshot)
            if report.ok:
                self.consecutive_failures = 0
                self._validated = self.snapshot
                result.ok = True
                result.version = self.version
                return result
            self.consecutive_failures += 1
            result.ok = False
            result.failures.append({"reasons": [_reason(r) for r in report.reasons],
                                    "consecutive": self.consecutive_failures, "version": self.version})
            if self.consecutive_failures >= self.max_failures:
                result.halt = True
                return result
            self._snapshot()
            result.refreshed = True
            result.version = self.version

    def _unchanged_since_validated(self) -> bool:
        """The fast path: True only when a full validation now would pass for the same reasons."""
        snap = self.snapshot
        if self.file_hash is None or snap is None or snap is not self._validated:
            return False
        captured = getattr(snap, "source_files", None)
        verified_at = getattr(snap, "last_verified_at", None)
        if not isinstance(captured, dict) or verified_at is None:
            return False
        if time.time() - float(verified_at) >= self.fresh_for_s - 1.0:  # about to go stale: the manager decides
            return False
        return all(self._same_content(path, digest) for path, digest in captured.items())

    def _same_content(self, path: str, captured: str | None) -> bool:
        assert self.root is not None and self.file_hash is not None
        try:
            st = os.stat(self.root / path)
        except OSError:
            return False
        sig = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)
        known = self._stats.get(path)
        if known is not None and known == (sig, captured):
            return True
        if self.file_hash(path) != captured:
            return False
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) > _RACY_S * 1e9:
            self._stats[path] = (sig, captured)
        return True

    def context_texts(self) -> list[str]:
        """One rendered block per chunk, in retrieval order (memory drops from the end when over budget)."""
        return [render_chunks([c]) for c in self.chunks]


def _reason(reason: Any) -> str:
    """`code: message` for the context package's Reason objects, str() for anything else."""
    code, message = getattr(reason, "code", None), getattr(reason, "message", None)
    return f"{code}: {message}" if code and message else str(reason)


def context_file_hash(root: str | os.PathLike[str], context: Any) -> Callable[[str], str | None]:
    """The hash `lagoon.context.ContextManager` captures for a file (None: unreadable or binary),
    for the gate's fast path."""
    from lagoon.context.chunking import content_hash
    from lagoon.context.fileset import FileSet

    files = FileSet(Path(root), context)

    def file_hash(path: str) -> str | None:
        text = files.read(path)
        return None if text is None else content_hash(text)

    return file_hash
