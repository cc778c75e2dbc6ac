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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from lagoon.agent.tools.search import render_chunks
from lagoon.protocols import ChunkLike, Retriever

__all__ = ["ContextGate", "GateResult", "SnapshotManager", "ValidationReport"]


@runtime_checkable
class ValidationReport(Protocol):
    ok: bool
    reasons: Sequence[str]


@runtime_checkable
class SnapshotManager(Protocol):
    """What the gate needs from `lagoon.context.ContextManager`."""

    def create_snapshot(self, task_id: str, chunks: Sequence[Any]) -> Any:
        """A new snapshot of `chunks`, versioned one past `task_id`'s latest (1 for a new task)."""
        ...

    def validate(self, snapshot: Any) -> ValidationReport: ...


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
    ) -> None:
        self.task = task
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
        while True:
            report = self.manager.validate(self.snapshot)
            if report.ok:
                self.consecutive_failures = 0
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

    def context_texts(self) -> list[str]:
        """One rendered block per chunk, in retrieval order (memory drops from the end when over budget)."""
        return [render_chunks([c]) for c in self.chunks]


def _reason(reason: Any) -> str:
    """`code: message` for the context package's Reason objects, str() for anything else."""
    code, message = getattr(reason, "code", None), getattr(reason, "message", None)
    return f"{code}: {message}" if code and message else str(reason)
