"""Versioned context snapshots with declared assumptions, their validation, and an audit trail.

`ContextManager.create_snapshot(task_id, chunks, assumptions, reason=)` captures what an agent step
relies on: the chunks, the assumptions it declares (each an `Assumption`: a named claim, the
executable check that decides it, and the check's last result and time), why this version was taken,
when it was last verified, the content hash of every source file the chunks come from, and a
complexity score counted on the syntax tree (definitions plus branching nodes, by tree-sitter — not
a regex). Running the checks is the agent's business (`lagoon.agent.assumptions`); this module
records their results. `validate(snapshot)` lists every
reason it may not be acted on, each with a machine-readable code:

- ``stale``: last verified longer ago than `context.staleness_threshold_ms`
  (checked when `validation.require_fresh_context`);
- ``unverified_assumptions``: an assumption's check did not pass, or never ran (when
  `validation.reject_unverified_assumptions`);
- ``too_many_assumptions``: more than `context.max_assumptions_per_snapshot`;
- ``source_changed`` / ``source_deleted``: a source file differs from, or is gone since, capture.

`increment_version` re-verifies a snapshot (bumping its version when
`context.version_increment_on_validation`). Consumed-chunk tracking: chunks handed to a model are
marked with `mark_consumed`; they expire `context.chunk_ttl_s` later, and a chunk whose file changed
since it was consumed is invalidated at once. Every version and every event is kept in SQLite (WAL)
under ``<repo>/.lagoon/context.sqlite``; `export(task_id)` returns it as versioned JSON.

This is *not* the retriever (see `lagoon.context.retriever`) and it does not decide what the agent
does with a failed validation.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from lagoon.config import DEFAULT_STATE_DIR, ContextSection, ValidationSection
from lagoon.context.chunking import Chunk, content_hash
from lagoon.context.complexity import complexity_score
from lagoon.context.fileset import FileSet
from lagoon.errors import SessionError

__all__ = ["Assumption", "ContextManager", "Snapshot", "ValidationReport", "Reason", "EXPORT_FORMAT",
           "EXPORT_VERSION"]

EXPORT_FORMAT = "lagoon.context.snapshots"
EXPORT_VERSION = 2  # 2: assumptions are records (claim, check, result, when); snapshots carry a reason

_SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshot (
    task_id TEXT NOT NULL, version INTEGER NOT NULL, recorded_at REAL NOT NULL, payload TEXT NOT NULL,
    PRIMARY KEY (task_id, version));
CREATE TABLE IF NOT EXISTS event (
    id INTEGER PRIMARY KEY AUTOINCREMENT, task_id TEXT, version INTEGER, at REAL NOT NULL,
    kind TEXT NOT NULL, detail TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS consumed (
    content_hash TEXT PRIMARY KEY, path TEXT NOT NULL, file_hash TEXT, consumed_at REAL NOT NULL,
    invalidated_at REAL);
"""


@dataclass(frozen=True)
class Assumption:
    """A named claim and the executable check that decides it.

    `kind` says how `check` runs (see `lagoon.agent.assumptions`): ``file_hash``, ``symbol``,
    ``test_fails``, ``git_head`` and ``dependency`` are derived by code; ``shell`` and ``python``
    are declared by the model. `holds` is the last result (None: never checked), `checked_at` when.
    `watch` lists the files whose change may change the result (empty: anything the agent does)."""

    name: str
    claim: str
    check: str
    kind: str = "shell"
    source: str = "model"
    """``derived`` (by code from what was retrieved or observed) or ``model`` (the `assume` tool)."""
    holds: bool | None = None
    checked_at: float | None = None
    watch: tuple[str, ...] = ()
    detail: str = ""
    """What the last check printed or found (cut short), for the model and the export."""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "claim": self.claim, "check": self.check, "kind": self.kind,
                "source": self.source, "holds": self.holds, "checked_at": self.checked_at,
                "watch": list(self.watch), "detail": self.detail}

    @classmethod
    def from_dict(cls, name: str, data: Any) -> Assumption:
        if isinstance(data, bool):  # format 1 stored name → verified?
            return cls(name=name, claim=name, check="", kind="declared", holds=data)
        return cls(name=str(data["name"]), claim=str(data["claim"]), check=str(data["check"]),
                   kind=str(data["kind"]), source=str(data["source"]), holds=data["holds"],
                   checked_at=data["checked_at"], watch=tuple(data["watch"]), detail=str(data["detail"]))


def as_assumptions(assumptions: Mapping[str, bool | Assumption] | Iterable[Assumption] | None) -> dict[str, Assumption]:
    """Name → `Assumption`; a bare `name: bool` is a claim recorded without a check (API callers)."""
    if assumptions is None:
        return {}
    if isinstance(assumptions, Mapping):
        return {str(k): v if isinstance(v, Assumption) else Assumption.from_dict(str(k), bool(v))
                for k, v in assumptions.items()}
    return {a.name: a for a in assumptions}


@dataclass(frozen=True, eq=True)
class Snapshot:
    task_id: str
    version: int
    chunks: tuple[Chunk, ...]
    assumptions: Mapping[str, Assumption]
    created_at: float
    last_verified_at: float
    source_files: Mapping[str, str | None]
    """Path → content hash at capture (None: the file did not exist then)."""
    complexity_score: int
    reason: str = "initial"
    """Why this version was taken: ``initial``, ``resumed``, or what made the last one unusable."""

    __hash__ = None  # type: ignore[assignment]  # holds mappings

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "version": self.version,
            "chunks": [c.to_dict() for c in self.chunks],
            "assumptions": {k: a.to_dict() for k, a in self.assumptions.items()},
            "created_at": self.created_at,
            "last_verified_at": self.last_verified_at,
            "source_files": dict(self.source_files),
            "complexity_score": self.complexity_score,
            "reason": self.reason,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Snapshot:
        return cls(
            task_id=data["task_id"],
            version=int(data["version"]),
            chunks=tuple(Chunk.from_dict(c) for c in data["chunks"]),
            assumptions={str(k): Assumption.from_dict(str(k), v) for k, v in data["assumptions"].items()},
            created_at=float(data["created_at"]),
            last_verified_at=float(data["last_verified_at"]),
            source_files=dict(data["source_files"]),
            complexity_score=int(data["complexity_score"]),
            reason=str(data.get("reason", "initial")),  # format 1 had none
        )


@dataclass(frozen=True)
class Reason:
    code: str
    """One of: stale, unverified_assumptions, too_many_assumptions, source_changed, source_deleted."""
    message: str
    subjects: tuple[str, ...] = ()
    """What the reason is about: assumption names or file paths."""


@dataclass(frozen=True)
class ValidationReport:
    ok: bool
    reasons: tuple[Reason, ...] = field(default_factory=tuple)

    @property
    def codes(self) -> list[str]:
        return [r.code for r in self.reasons]

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reasons": [
                {"code": r.code, "message": r.message, "subjects": list(r.subjects)} for r in self.reasons
            ],
        }


class ContextManager:
    """Creates, validates and re-verifies snapshots; tracks consumed chunks; keeps the audit trail."""

    def __init__(
        self,
        repo: Path,
        context: ContextSection,
        validation: ValidationSection,
        db_path: Path | None = None,
        *,
        clock: Callable[[], float] = time.time,
        state_dir: str = DEFAULT_STATE_DIR,
    ) -> None:
        self.repo = Path(repo).resolve()
        self.context, self.validation, self.clock = context, validation, clock
        self.files = FileSet(self.repo, context, state_dir=state_dir)
        self.db_path = Path(db_path) if db_path else self.repo / state_dir / "context.sqlite"
        self.db_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(
                self.db_path, timeout=30, check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            # With WAL, NORMAL stays consistent after a crash; only a power loss can drop the last
            # commits. It saves an fsync per snapshot.
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise SessionError(
                f"{self.db_path}: cannot open the context store ({exc}); delete it to start over"
            ) from exc

    def close(self) -> None:
        self._db.close()

    # -- storage --------------------------------------------------------------------------------
    def _tx(self, statements: Iterable[tuple[str, tuple]]) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for sql, args in statements:
                    self._db.execute(sql, args)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def _event(self, snap: Snapshot | None, kind: str, detail: Mapping[str, Any], task_id: str | None = None):
        return (
            "INSERT INTO event (task_id, version, at, kind, detail) VALUES (?, ?, ?, ?, ?)",
            (
                snap.task_id if snap else task_id,
                snap.version if snap else None,
                self.clock(),
                kind,
                json.dumps(detail),
            ),
        )

    def _save(self, snap: Snapshot, kind: str, detail: Mapping[str, Any]) -> Snapshot:
        self._tx(
            [
                (
                    "INSERT OR REPLACE INTO snapshot (task_id, version, recorded_at, payload) VALUES (?, ?, ?, ?)",
                    (snap.task_id, snap.version, self.clock(), json.dumps(snap.to_dict())),
                ),
                self._event(snap, kind, detail),
            ]
        )
        return snap

    def history(self, task_id: str) -> list[Snapshot]:
        """Every stored version of a task's snapshot, oldest first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT payload FROM snapshot WHERE task_id = ? ORDER BY version", (task_id,)
            ).fetchall()
        return [Snapshot.from_dict(json.loads(r[0])) for r in rows]

    def latest(self, task_id: str) -> Snapshot | None:
        with self._lock:
            row = self._db.execute(
                "SELECT payload FROM snapshot WHERE task_id = ? ORDER BY version DESC LIMIT 1", (task_id,)
            ).fetchone()
        return Snapshot.from_dict(json.loads(row[0])) if row else None

    # -- snapshots ------------------------------------------------------------------------------
    def _file_hash(self, path: str) -> str | None:
        text = self.files.read(path) if (self.repo / path).is_file() else None
        return None if text is None else content_hash(text)

    def create_snapshot(
        self,
        task_id: str,
        chunks: Sequence[Chunk],
        assumptions: Mapping[str, bool | Assumption] | Iterable[Assumption] | None = None,
        *,
        reason: str = "initial",
    ) -> Snapshot:
        """Capture a new version (1, or one past the task's latest) and record it with `reason`."""
        now = self.clock()
        prev = self.latest(task_id)
        paths = sorted({c.path for c in chunks})
        snap = Snapshot(
            task_id=task_id,
            version=(prev.version + 1) if prev else 1,
            chunks=tuple(chunks),
            assumptions=as_assumptions(assumptions),
            created_at=now,
            last_verified_at=now,
            source_files={p: self._file_hash(p) for p in paths},
            complexity_score=complexity_score(chunks),
            reason=reason,
        )
        return self._save(snap, "created", {"chunks": len(chunks), "reason": reason,
                                            "assumptions": {k: a.holds for k, a in snap.assumptions.items()}})

    def validate(self, snapshot: Snapshot) -> ValidationReport:
        """Every reason the snapshot must not be acted on (empty when ok); recorded in the trail."""
        reasons: list[Reason] = []
        age_ms = (self.clock() - snapshot.last_verified_at) * 1000.0
        limit = self.context.staleness_threshold_ms
        if self.validation.require_fresh_context and age_ms > limit:
            reasons.append(
                Reason("stale", f"last verified {age_ms / 1000:.1f} s ago; the limit is {limit / 1000:.1f} s")
            )
        unverified = tuple(sorted(k for k, a in snapshot.assumptions.items() if a.holds is not True))
        if self.validation.reject_unverified_assumptions and unverified:
            reasons.append(
                Reason("unverified_assumptions", f"unverified: {', '.join(unverified)}", unverified)
            )
        cap = self.context.max_assumptions_per_snapshot
        if len(snapshot.assumptions) > cap:
            reasons.append(
                Reason(
                    "too_many_assumptions",
                    f"{len(snapshot.assumptions)} assumptions declared; at most {cap} allowed",
                )
            )
        changed, deleted = [], []
        for path, captured in snapshot.source_files.items():
            now_hash = self._file_hash(path)
            if now_hash is None and captured is not None:
                deleted.append(path)
            elif now_hash != captured:
                changed.append(path)
        if changed:
            reasons.append(
                Reason("source_changed", f"changed since capture: {', '.join(changed)}", tuple(changed))
            )
            self.invalidate_files(changed)
        if deleted:
            reasons.append(
                Reason("source_deleted", f"deleted since capture: {', '.join(deleted)}", tuple(deleted))
            )
            self.invalidate_files(deleted)
        report = ValidationReport(not reasons, tuple(reasons))
        self._tx([self._event(snapshot, "validated", report.to_dict())])
        return report

    def increment_version(self, snapshot: Snapshot) -> Snapshot:
        """Re-verify: refresh `last_verified_at` and the file hashes; bump the version if configured."""
        return self._reverify(snapshot, dict(snapshot.assumptions), "reverified", {})

    def verify_assumption(self, snapshot: Snapshot, name: str, holds: bool = True) -> Snapshot:
        """Record the outcome of checking one assumption (declaring it, without a check, if new);
        re-verifies the snapshot."""
        old = snapshot.assumptions.get(name) or Assumption(name=name, claim=name, check="", kind="declared")
        assumptions = {**snapshot.assumptions, name: replace(old, holds=bool(holds), checked_at=self.clock())}
        return self._reverify(
            snapshot, assumptions, "assumption_verified", {"name": name, "holds": bool(holds)}
        )

    def _reverify(self, snap: Snapshot, assumptions: dict[str, Assumption], kind: str, detail: dict) -> Snapshot:
        bump = self.context.version_increment_on_validation
        latest = self.latest(snap.task_id)
        version = (max(snap.version, latest.version if latest else 0) + 1) if bump else snap.version
        new = replace(
            snap,
            version=version,
            assumptions=assumptions,
            last_verified_at=self.clock(),
            source_files={p: self._file_hash(p) for p in snap.source_files},
        )
        return self._save(new, kind, {**detail, "from_version": snap.version})

    # -- consumed chunks ------------------------------------------------------------------------
    def mark_consumed(self, chunks: Iterable[Chunk], task_id: str | None = None) -> None:
        """Record that these chunks were handed to a model now (restarting their TTL)."""
        chunks = list(chunks)
        now = self.clock()
        rows = [
            (
                "INSERT OR REPLACE INTO consumed (content_hash, path, file_hash, consumed_at, invalidated_at) "
                "VALUES (?, ?, ?, ?, NULL)",
                (c.content_hash, c.path, self._file_hash(c.path), now),
            )
            for c in chunks
        ]
        self._tx([*rows, self._event(None, "consumed", {"chunks": [c.location for c in chunks]}, task_id)])

    def chunk_state(self, chunk: Chunk) -> str:
        """'unused', 'live', 'expired' (TTL passed) or 'invalidated' (its file changed since use)."""
        with self._lock:
            row = self._db.execute(
                "SELECT file_hash, consumed_at, invalidated_at FROM consumed WHERE content_hash = ?",
                (chunk.content_hash,),
            ).fetchone()
        if row is None:
            return "unused"
        file_hash, consumed_at, invalidated_at = row
        if invalidated_at is not None:
            return "invalidated"
        if self._file_hash(chunk.path) != file_hash:
            self.invalidate_files([chunk.path])
            return "invalidated"
        if self.clock() - consumed_at > self.context.chunk_ttl_s:
            return "expired"
        return "live"

    def live_chunks(self, chunks: Iterable[Chunk]) -> list[Chunk]:
        """The chunks still safe to keep in front of the model (consumed, within TTL, file unchanged)."""
        return [c for c in chunks if self.chunk_state(c) == "live"]

    def invalidate_files(self, paths: Iterable[str]) -> None:
        """Invalidate every consumed chunk from these files at once."""
        paths = list(paths)
        now = self.clock()
        stmts = [
            ("UPDATE consumed SET invalidated_at = ? WHERE path = ? AND invalidated_at IS NULL", (now, p))
            for p in paths
        ]
        self._tx([*stmts, self._event(None, "invalidated", {"paths": paths})])

    # -- audit ----------------------------------------------------------------------------------
    def export(self, task_id: str) -> dict[str, Any]:
        """Every version and event of a task as JSON-ready data with a format version."""
        with self._lock:
            events = self._db.execute(
                "SELECT version, at, kind, detail FROM event WHERE task_id = ? ORDER BY id", (task_id,)
            ).fetchall()
        return {
            "format": EXPORT_FORMAT,
            "format_version": EXPORT_VERSION,
            "task_id": task_id,
            "versions": [s.to_dict() for s in self.history(task_id)],
            "events": [
                {"version": v, "at": at, "kind": k, "detail": json.loads(d)} for v, at, k, d in events
            ],
        }
