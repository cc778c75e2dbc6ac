"""`SessionStore`: the durable, append-only record of agent sessions (SQLite, WAL, one writer).

One database per workspace, `<workspace>/<agent.state_dir>/sessions.db`, with tables

    sessions   id, repo, task, status, owner pid, created/updated times, meta (JSON)
    events     (session_id, seq) → kind, payload (JSON), ts      — append-only (triggers refuse
               UPDATE and DELETE); seq counts 1, 2, 3 … per session with no gaps
    terminal   every command the agent ran: step, command, exit code, duration, output tail
    tool_state the latest tool state (cwd, env changes, undo history) per session
    locks      advisory file locks: path → holding session
    snapshots  context snapshot versions per session: why each was taken, its chunks, and its
               assumptions (claim, check, result, when)

Every write is its own transaction (or one `batch()` of writes that belong together), committed
before the agent acts on it: a tool call is written as a `tool_intent` event, then run, then its
`tool_result` together with the command's terminal record and the tool state it left. A process killed in between leaves an
intent without a result, which `pending_intents` finds on resume. WAL with synchronous=NORMAL
survives the process being killed at any point (a power cut may lose the last commits).

Everything written passes through a `Redactor`, so secret values from the environment never reach
the file. The session id is deterministic (`session_id_for(repo, task)`), so the same task in the
same repository resumes. This module is *not* a multi-writer server: one process owns a session at
a time (`open` refuses a session whose owner is still alive).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sqlite3
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from lagoon.agent.redaction import Redactor
from lagoon.errors import SessionError, WorkspaceError

__all__ = ["SessionStore", "SessionLocks", "session_id_for", "FORMAT_VERSION", "DB_NAME"]

FORMAT_VERSION = 1
DB_NAME = "sessions.db"
OUTPUT_TAIL_CHARS = 4000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id TEXT PRIMARY KEY, repo TEXT NOT NULL, task TEXT NOT NULL, status TEXT NOT NULL,
    owner_pid INTEGER, created_at REAL NOT NULL, updated_at REAL NOT NULL, meta TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS events (
    session_id TEXT NOT NULL REFERENCES sessions(id), seq INTEGER NOT NULL, kind TEXT NOT NULL,
    payload TEXT NOT NULL, ts REAL NOT NULL, PRIMARY KEY (session_id, seq));
CREATE TRIGGER IF NOT EXISTS events_no_update BEFORE UPDATE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TRIGGER IF NOT EXISTS events_no_delete BEFORE DELETE ON events
    BEGIN SELECT RAISE(ABORT, 'events are append-only'); END;
CREATE TABLE IF NOT EXISTS terminal (
    session_id TEXT NOT NULL, step INTEGER NOT NULL, command TEXT NOT NULL, exit_code INTEGER,
    duration_s REAL, output_tail TEXT, ts REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tool_state (
    session_id TEXT PRIMARY KEY, state TEXT NOT NULL, updated_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS locks (
    path TEXT PRIMARY KEY, session_id TEXT NOT NULL, acquired_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS snapshots (
    session_id TEXT NOT NULL, version INTEGER NOT NULL, payload TEXT NOT NULL, ts REAL NOT NULL,
    PRIMARY KEY (session_id, version));
"""


def session_id_for(repo: str | os.PathLike[str], task: str) -> str:
    """A stable id for (repository, task): the same task in the same repository resumes."""
    digest = hashlib.sha256(f"{Path(repo).resolve()}\0{task.strip()}".encode()).hexdigest()
    return f"s-{digest[:16]}"


def _pid_alive(pid: int | None) -> bool:
    if not pid or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class SessionStore:
    """All sessions of one workspace. Cheap to open; not shared between threads."""

    def __init__(self, path: str | os.PathLike[str], *, redactor: Redactor | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.redactor = redactor or Redactor()
        self._batch_depth = 0
        try:
            self.db = sqlite3.connect(self.path, isolation_level=None, timeout=10.0)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(_SCHEMA)
        except sqlite3.DatabaseError as exc:
            raise SessionError(f"{self.path}: not a readable session database ({exc}); move it aside") from exc

    @classmethod
    def for_workspace(cls, root: str | os.PathLike[str], state_dir: str = ".lagoon", **kw: Any) -> SessionStore:
        return cls(Path(root) / state_dir / DB_NAME, **kw)

    def close(self) -> None:
        self.db.close()

    def _json(self, value: Any) -> str:
        return json.dumps(self.redactor.scrub(value), default=str, ensure_ascii=False)

    def _tx(self) -> _Transaction | contextlib.nullcontext[None]:
        return contextlib.nullcontext() if self._batch_depth else _Transaction(self.db)

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Make the writes inside one transaction: all of them are committed, or none."""
        if self._batch_depth:
            self._batch_depth += 1
            try:
                yield
            finally:
                self._batch_depth -= 1
            return
        with _Transaction(self.db):
            self._batch_depth = 1
            try:
                yield
            finally:
                self._batch_depth = 0

    # -- sessions -----------------------------------------------------------------------------
    def open(self, session_id: str, repo: str, task: str, meta: Mapping[str, Any] | None = None) -> bool:
        """Create or take over `session_id`; True when it already existed (a resume)."""
        now = time.time()
        with self._tx():
            row = self.db.execute("SELECT owner_pid, status FROM sessions WHERE id=?", (session_id,)).fetchone()
            if row is None:
                self.db.execute(
                    "INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?)",
                    (session_id, str(repo), self.redactor.scrub(task), "running", os.getpid(), now, now,
                     self._json(dict(meta or {}))),
                )
                return False
            if row[1] == "running" and _pid_alive(row[0]):
                raise SessionError(
                    f"session {session_id} is in use by process {row[0]}; wait for it or pass another --session"
                )
            self.db.execute(
                "UPDATE sessions SET owner_pid=?, updated_at=? WHERE id=?", (os.getpid(), now, session_id)
            )
            return True

    def set_status(self, session_id: str, status: str) -> None:
        with self._tx():
            self.db.execute(
                "UPDATE sessions SET status=?, updated_at=?, owner_pid=NULL WHERE id=?",
                (status, time.time(), session_id),
            )

    def get(self, session_id: str) -> dict[str, Any]:
        row = self.db.execute(
            "SELECT id, repo, task, status, owner_pid, created_at, updated_at, meta FROM sessions WHERE id=?",
            (session_id,),
        ).fetchone()
        if row is None:
            known = ", ".join(s["id"] for s in self.list()[:10]) or "none"
            raise SessionError(f"no session {session_id!r} in {self.path}; known sessions: {known}")
        keys = ("id", "repo", "task", "status", "owner_pid", "created_at", "updated_at", "meta")
        out = dict(zip(keys, row, strict=True))
        out["meta"] = json.loads(out["meta"])
        out["events"] = self.db.execute("SELECT COUNT(*) FROM events WHERE session_id=?", (session_id,)).fetchone()[0]
        return out

    def list(self) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT s.id, s.task, s.status, s.updated_at, COUNT(e.seq) FROM sessions s "
            "LEFT JOIN events e ON e.session_id = s.id GROUP BY s.id ORDER BY s.updated_at DESC"
        ).fetchall()
        return [dict(zip(("id", "task", "status", "updated_at", "events"), r, strict=True)) for r in rows]

    # -- events (SessionStore protocol) ---------------------------------------------------------
    def append(self, session_id: str, kind: str, payload: Mapping[str, Any]) -> int:
        """Commit one event and return its sequence number."""
        body = self._json(dict(payload))
        now = time.time()
        with self._tx():
            seq = self.db.execute(
                "SELECT COALESCE(MAX(seq), 0) + 1 FROM events WHERE session_id=?", (session_id,)
            ).fetchone()[0]
            self.db.execute("INSERT INTO events VALUES (?,?,?,?,?)", (session_id, seq, kind, body, now))
            self.db.execute("UPDATE sessions SET updated_at=? WHERE id=?", (now, session_id))
        return seq

    def events(self, session_id: str) -> Iterator[dict[str, Any]]:
        cur = self.db.execute(
            "SELECT seq, kind, payload, ts FROM events WHERE session_id=? ORDER BY seq", (session_id,)
        )
        for seq, kind, payload, ts in cur:
            yield {"seq": seq, "kind": kind, "payload": json.loads(payload), "ts": ts}

    # -- terminal, tool state, snapshots --------------------------------------------------------
    def record_command(
        self, session_id: str, step: int, command: str, exit_code: int | None, duration_s: float, output: str
    ) -> None:
        with self._tx():
            self.db.execute(
                "INSERT INTO terminal VALUES (?,?,?,?,?,?,?)",
                (session_id, step, self.redactor.scrub(command), exit_code, duration_s,
                 self.redactor.scrub(output[-OUTPUT_TAIL_CHARS:]), time.time()),
            )

    def terminal(self, session_id: str) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT step, command, exit_code, duration_s FROM terminal WHERE session_id=? ORDER BY rowid",
            (session_id,),
        ).fetchall()
        return [dict(zip(("step", "command", "exit_code", "duration_s"), r, strict=True)) for r in rows]

    def save_tool_state(self, session_id: str, state: Mapping[str, Any]) -> None:
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO tool_state VALUES (?,?,?)", (session_id, self._json(dict(state)), time.time())
            )

    def load_tool_state(self, session_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT state FROM tool_state WHERE session_id=?", (session_id,)).fetchone()
        return json.loads(row[0]) if row else None

    def record_snapshot(self, session_id: str, version: int, payload: Mapping[str, Any]) -> None:
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO snapshots VALUES (?,?,?,?)",
                (session_id, version, self._json(dict(payload)), time.time()),
            )

    def snapshots(self, session_id: str) -> list[dict[str, Any]]:
        """Every recorded snapshot, oldest first: version, reason, chunks, assumptions (claim, check,
        result, when)."""
        rows = self.db.execute(
            "SELECT version, payload, ts FROM snapshots WHERE session_id=? ORDER BY version", (session_id,))
        return [{"version": v, **json.loads(payload), "recorded_at": ts} for v, payload, ts in rows]

    def snapshot_versions(self, session_id: str) -> list[int]:
        rows = self.db.execute("SELECT version FROM snapshots WHERE session_id=? ORDER BY version", (session_id,))
        return [r[0] for r in rows]

    # -- locks ----------------------------------------------------------------------------------
    def acquire_lock(self, session_id: str, path: str) -> None:
        with self._tx():
            row = self.db.execute(
                "SELECT l.session_id, s.status, s.owner_pid FROM locks l LEFT JOIN sessions s ON s.id = l.session_id "
                "WHERE l.path=?",
                (path,),
            ).fetchone()
            if row is not None and row[0] != session_id and row[1] == "running" and _pid_alive(row[2]):
                raise WorkspaceError(
                    f"{path} is locked by session {row[0]} (process {row[2]}); edit another file or wait for it"
                )
            self.db.execute("INSERT OR REPLACE INTO locks VALUES (?,?,?)", (path, session_id, time.time()))

    def release_locks(self, session_id: str) -> None:
        with self._tx():
            self.db.execute("DELETE FROM locks WHERE session_id=?", (session_id,))

    def locks(self, session_id: str | None = None) -> dict[str, str]:
        rows = self.db.execute("SELECT path, session_id FROM locks").fetchall()
        return {p: s for p, s in rows if session_id is None or s == session_id}

    # -- export ---------------------------------------------------------------------------------
    def export(self, session_id: str) -> dict[str, Any]:
        """The JSON trajectory: every event in order with its sequence number."""
        info = self.get(session_id)
        return {
            "format_version": FORMAT_VERSION,
            "session": info,
            "events": list(self.events(session_id)),
            "terminal": self.terminal(session_id),
            "snapshot_versions": self.snapshot_versions(session_id),
            "snapshots": self.snapshots(session_id),
        }


class SessionLocks:
    """The edit tool's `LockKeeper` for one session."""

    def __init__(self, store: SessionStore, session_id: str) -> None:
        self.store = store
        self.session_id = session_id

    def acquire(self, path: str) -> None:
        self.store.acquire_lock(self.session_id, path)


class _Transaction:
    """BEGIN IMMEDIATE … COMMIT (ROLLBACK on error), translating sqlite errors to SessionError."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
            return
        self.db.execute("ROLLBACK")
        if isinstance(exc, sqlite3.DatabaseError):
            raise SessionError(f"session database error: {exc}; the last write was rolled back") from exc
