"""`ContextGate`: the agent never acts on stale context or on a broken assumption.

Before every model call the loop asks the gate to `check()`, which does, in order:

1. **Assumptions** (`AssumptionBook.refresh`): re-run the checks that could have changed (stat
   first). A derived assumption found false (a file changed since it was read, a failing test now
   passes, HEAD moved) is one failed validation; so is a model assumption found false when
   `validation.reject_unverified_assumptions` (otherwise its drift is recorded and the run goes on).
   Every changed result is reported as drift.
2. **Why else to re-snapshot**: a model assumption was declared, a consumed chunk passed
   `context.chunk_ttl_s`, or the run learned something that changes the retrieval query (a new
   failing test or traceback frame: `lagoon.context.evidence.Evidence`).
3. **Validation** by the injected `SnapshotManager` (`lagoon.context.ContextManager` in production):
   staleness, unverified or too many assumptions, changed or deleted source files.

A failure counts one; the gate then re-retrieves with the evidence-grown query, re-derives the
assumptions, re-runs the model's (re-verification), takes a new snapshot — numbered one past the
task's latest, with the reason — and validates that.
`validation.max_consecutive_validation_failures` failures in a row without a passing validation end
the check with `halt=True` (the loop raises `ValidationHalt`, naming the reasons). A pass resets it.

Each snapshot the gate takes is queued as a `SnapshotRecord` (`take_snapshots`) for the session
store: version, reason, chunks and every assumption (claim, check, result, when).

Fast path (when given `file_hash`, the manager's own content hash): after a snapshot has passed one
full validation, a check that finds every source file's stat (mtime, ctime, size, inode) unchanged —
or, when it changed, the file's hash still equal to the one the snapshot captured — no assumption
changed, and the snapshot younger than `fresh_for_s` (less a second) passes without asking the
manager again. A stat is trusted only once the file is older than `_RACY_S` (as git does with its
index), so two writes inside one timestamp tick are never missed. The context store's audit trail
therefore records full validations only.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lagoon.agent.assumptions import AssumptionBook, Drift
from lagoon.agent.tools.search import render_chunks
from lagoon.context.evidence import Evidence
from lagoon.context.snapshot import Assumption
from lagoon.protocols import ChunkLike, Retriever, SnapshotManager

__all__ = ["ContextGate", "GateResult", "SnapshotRecord", "context_file_hash"]

_RACY_S = 2.0  # a file touched this recently is hashed on every check: its stat may not show the next write


@dataclass(frozen=True)
class SnapshotRecord:
    """A snapshot as the session keeps it: why it was taken, what it held, what it assumed."""

    version: int
    reason: str
    chunks: tuple[str, ...]
    assumptions: tuple[Assumption, ...]
    at: float

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "reason": self.reason, "chunks": list(self.chunks), "at": self.at,
                "assumptions": [a.to_dict() for a in self.assumptions]}


@dataclass
class GateResult:
    ok: bool
    version: int
    refreshed: bool = False
    halt: bool = False
    failures: list[dict[str, Any]] = field(default_factory=list)
    """Each failed validation during this check, in order: {reasons, consecutive, version}."""
    drift: list[Drift] = field(default_factory=list)
    """Assumptions whose check result changed during this check."""


def _where(c: ChunkLike) -> str:
    return f"{c.path}:{c.start_line}-{c.end_line}"


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
        assumptions: AssumptionBook | None = None,
        max_assumptions: int = 5,
        reject_unverified: bool = True,
        chunk_ttl_s: float = math.inf,
        evidence: Evidence | None = None,
        clock: Callable[[], float] = time.time,
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
        self.book = assumptions if assumptions is not None else (
            AssumptionBook(self.root, file_hash=self.file_hash) if self.root is not None else None)
        self.max_assumptions = max_assumptions
        self.reject_unverified = reject_unverified
        self.chunk_ttl_s = chunk_ttl_s
        self.evidence = evidence if evidence is not None else Evidence(str(self.root) if self.root else None)
        self.clock = clock
        self.chunks: list[ChunkLike] = []
        self.snapshot: Any = None
        self.version = 0
        self.consecutive_failures = 0
        self.query = task
        self._consumed_at = 0.0
        self._evidence_seen = 0
        self._declared_seen: dict[str, Any] = {}
        self._pending: list[SnapshotRecord] = []

    # -- snapshots ----------------------------------------------------------------------------
    def _retrieve(self) -> list[ChunkLike]:
        if self.retriever is None:
            return []
        self.query = self.evidence.query(self.task)
        return list(self.retriever.retrieve(self.query, k=self.k, budget_tokens=self.budget_tokens))

    def declared_assumptions(self) -> list[Assumption]:
        return self.book.select(self.max_assumptions) if self.book is not None else []

    def _snapshot(self, reason: str) -> None:
        """Re-retrieve, re-derive and re-verify the assumptions, and take the next version."""
        self.chunks = self._retrieve()
        self._evidence_seen = self.evidence.revision
        if self.book is not None:
            self.book.derive(self.chunks, self.evidence, room=self.max_assumptions - len(self.book.declared))
            self.book.reverify_declared()
            self._declared_seen = {n: a.holds for n, a in self.book.declared.items()}
        assumptions = self.declared_assumptions()
        self.version += 1
        if self.manager is not None:
            self.snapshot = self.manager.create_snapshot(self.task_id, self.chunks, assumptions, reason=reason)
            self.version = int(getattr(self.snapshot, "version", self.version))
            if self.chunks:
                self.manager.mark_consumed(self.chunks, self.task_id)  # starts the chunks' TTL clock
        self._consumed_at = self.clock()
        self._pending.append(SnapshotRecord(self.version, reason, tuple(_where(c) for c in self.chunks),
                                            tuple(assumptions), self._consumed_at))

    def take_snapshots(self) -> list[SnapshotRecord]:
        """The snapshots taken since the last call (for the session store), oldest first."""
        out, self._pending = self._pending, []
        return out

    def start(self, last_version: int = 0, *, reason: str = "initial") -> int:
        """Retrieve and take the first snapshot (or, on resume, the one after `last_version`)."""
        self.version = last_version
        self._snapshot(reason)
        return self.version

    # -- what the run observes ----------------------------------------------------------------
    def observe(self, name: str, arguments: dict[str, Any], *, text: str, exit_code: int | None,
                files: Sequence[str] = (), edit: bool = False) -> None:
        """A tool result: evidence for the next query, and a workspace that may have changed."""
        if name == "bash":
            self.evidence.observe_output(str(arguments.get("command", "")), text, exit_code)
        if files and name in ("view", "edit"):
            self.evidence.observe_files(files, edited=edit)
        if name in ("bash", "edit") and self.book is not None:
            self.book.touch()

    # -- the check ----------------------------------------------------------------------------
    def _blocking(self, a: Assumption) -> bool:
        """A false assumption that makes the context unusable (see the module docstring)."""
        return a.holds is not True and (a.source == "derived" or self.reject_unverified)

    def _why_refresh(self) -> str | None:
        """A reason to take a new snapshot that is not a failure, or None."""
        if self.book is not None:
            declared = {n: a.holds for n, a in self.book.declared.items()}
            if declared != self._declared_seen:
                changed = [n for n in declared if self._declared_seen.get(n, "new") != declared[n]]
                return "assumptions_changed: " + ", ".join(changed)
        if self.chunks and self.clock() - self._consumed_at > self.chunk_ttl_s:
            return f"chunk_ttl: chunks consumed {self.clock() - self._consumed_at:.0f} s ago " \
                   f"(context.chunk_ttl_s={self.chunk_ttl_s:g})"
        if self.evidence.revision != self._evidence_seen and self.retriever is not None:
            return "new_evidence: " + (self.evidence.take_news() or "the query grew")
        return None

    def check(self) -> GateResult:
        result = GateResult(ok=True, version=self.version)
        if self.book is not None:
            result.drift = self.book.refresh()
            for d in result.drift:  # its check just showed the test passes: no longer evidence
                if d.assumption.kind == "test_fails" and d.assumption.holds is False:
                    self.evidence.failing.pop(d.name.removeprefix("fails:"), None)
        if self.manager is None:
            return result
        changed = [d.assumption.watch[0] for d in result.drift
                   if d.assumption.kind == "file_hash" and d.assumption.holds is False]
        if changed:
            self.manager.invalidate_files(changed)
        broken = self._broken()
        if broken:
            if self._fail(result, [_assumption_reason(a) for a in broken]):
                return result
        else:
            why = self._why_refresh()
            if why is not None:
                self._snapshot(why)
                result.refreshed = True
                result.version = self.version
            elif self._unchanged_since_validated():
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
            reasons = [_reason(r) for r in report.reasons]
            broken = self._broken()
            if broken:  # the manager knows names only; say what each claimed and how its check failed
                reasons = [r for r in reasons if not r.startswith("unverified_assumptions")]
                reasons += [_assumption_reason(a) for a in broken]
            if self._fail(result, reasons):
                return result

    def _broken(self) -> list[Assumption]:
        return [a for a in self.declared_assumptions() if self._blocking(a)] if self.book is not None else []

    def _fail(self, result: GateResult, reasons: list[str]) -> bool:
        """Count one failed validation; halt (True) past the limit, else re-snapshot (False)."""
        self.consecutive_failures += 1
        result.ok = False
        result.failures.append({"reasons": reasons, "consecutive": self.consecutive_failures,
                                "version": self.version})
        if self.consecutive_failures >= self.max_failures:
            result.halt = True
            return True
        self._snapshot("; ".join(reasons))
        result.refreshed = True
        result.version = self.version
        return False

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
        """The assumptions block, then one rendered block per chunk in retrieval order (memory drops
        blocks from the end when over budget, so the assumptions are dropped last)."""
        blocks = [render_chunks([c]) for c in self.chunks]
        declared = self.declared_assumptions()
        if declared:
            lines = ["Assumptions this context rests on (re-checked before every step):"]
            for a in declared:
                state = {True: "holds", False: "FAILED", None: "unchecked"}[a.holds]
                lines.append(f"- [{state}] {a.name}: {a.claim}" + (f" ({a.detail[:120]})" if a.holds is False else ""))
            blocks.insert(0, "\n".join(lines))
        return blocks


def _assumption_reason(a: Assumption) -> str:
    code = "source_changed" if a.kind == "file_hash" else "assumption_failed"
    detail = f": {a.detail[:200]}" if a.detail else ""
    return f"{code}: {a.name} ({a.claim}) — check `{a.check}` failed{detail}"


def _reason(reason: Any) -> str:
    """`code: message` for the context package's Reason objects, str() for anything else."""
    code, message = getattr(reason, "code", None), getattr(reason, "message", None)
    return f"{code}: {message}" if code and message else str(reason)


def context_file_hash(root: str | os.PathLike[str], context: Any, state_dir: str) -> Callable[[str], str | None]:
    """The hash `lagoon.context.ContextManager` captures for a file (None: unreadable or binary),
    for the gate's fast path."""
    from lagoon.context.chunking import content_hash
    from lagoon.context.fileset import FileSet

    files = FileSet(Path(root), context, state_dir=state_dir)

    def file_hash(path: str) -> str | None:
        text = files.read(path)
        return None if text is None else content_hash(text)

    return file_hash
