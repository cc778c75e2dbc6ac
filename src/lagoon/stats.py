"""`StatsStore`: the figures that must outlive one process, kept per day in SQLite.

One `lagoon run` or `lagoon route` classifies one task; the seed's alert ("reasoning-bound tasks
above 40% of the day") needs the day. Every router records into this store —

    classification   label = task type          (reasoning_bound | retrieval_bound)
    validation       label = passed | failed    (the agent's context validations)
    drift            value = assumptions found no longer true at one check

— one row per event with its time, so the rolling 24 h window and the per-day table (`days`) are
both queries. The alert's state (firing or not, since when) is a row too, changed in one
`BEGIN IMMEDIATE` transaction (`transition`), so of two processes crossing the limit together only
one fires it. The default file is `$XDG_STATE_HOME/lagoon/stats.sqlite` (`telemetry.stats_path`).

`lagoon stats` prints it; `lagoon metrics serve` exposes it to Prometheus (`collector`). This is
*not* the live per-process registry (`lagoon.telemetry.Telemetry`) and stores no prompts.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from lagoon.errors import SessionError

__all__ = ["StatsStore", "DayStats", "WindowStats", "default_stats_path", "DAY_S", "KINDS"]

DAY_S = 86_400.0
KINDS = ("classification", "validation", "drift")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sample (ts REAL NOT NULL, kind TEXT NOT NULL, label TEXT NOT NULL, value REAL NOT NULL);
CREATE INDEX IF NOT EXISTS sample_ts ON sample (ts);
CREATE TABLE IF NOT EXISTS alert (name TEXT PRIMARY KEY, firing INTEGER NOT NULL, changed_at REAL NOT NULL,
                                  message TEXT NOT NULL);
"""


def default_stats_path() -> Path:
    """`$XDG_STATE_HOME/lagoon/stats.sqlite`, XDG's place for state that outlives a run."""
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lagoon" / "stats.sqlite"


@dataclass
class WindowStats:
    """Totals over a span (a calendar day, UTC, or the rolling 24 h)."""

    classifications: dict[str, int] = field(default_factory=dict)
    validations_passed: int = 0
    validations_failed: int = 0
    assumption_drift: int = 0

    @property
    def tasks(self) -> int:
        return sum(self.classifications.values())

    @property
    def reasoning_share(self) -> float:
        return self.classifications.get("reasoning_bound", 0) / self.tasks if self.tasks else 0.0

    @property
    def validation_pass_rate(self) -> float | None:
        total = self.validations_passed + self.validations_failed
        return self.validations_passed / total if total else None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tasks": self.tasks, "reasoning_share": self.reasoning_share,
                "validation_pass_rate": self.validation_pass_rate}


@dataclass
class DayStats(WindowStats):
    day: str = ""


class StatsStore:
    """Samples and alert states in one SQLite file (WAL); safe to share between processes."""

    def __init__(self, path: str | os.PathLike[str] | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path) if path else default_stats_path()
        self.clock = clock
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
        except (OSError, sqlite3.DatabaseError) as exc:
            raise SessionError(
                f"{self.path}: cannot open the stats store ({exc}); set telemetry.stats_path to a writable "
                "file, or telemetry.persist_stats=false") from exc

    def close(self) -> None:
        self._db.close()

    def _rows(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # -- writing --------------------------------------------------------------------------------
    def record(self, kind: str, label: str = "", value: float = 1.0, *, at: float | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"stats kind {kind!r}: use one of {', '.join(KINDS)}")
        ts = self.clock() if at is None else at
        with self._lock:
            self._db.execute("INSERT INTO sample VALUES (?,?,?,?)", (ts, kind, label, float(value)))

    def transition(self, name: str, firing: bool, message: str = "") -> bool:
        """Set alert `name`'s state; True only for the call that turned it on (one process of many)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT firing FROM alert WHERE name=?", (name,)).fetchone()
                was = bool(row[0]) if row else False
                if row is None or was != firing:
                    self._db.execute("INSERT OR REPLACE INTO alert VALUES (?,?,?,?)",
                                     (name, int(firing), self.clock(), message))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return firing and not was

    # -- reading --------------------------------------------------------------------------------
    def _fill(self, out: WindowStats, rows: list[tuple]) -> WindowStats:
        for kind, label, total, n in rows:
            if kind == "classification":
                out.classifications[label] = int(n)
            elif kind == "validation":
                if label == "passed":
                    out.validations_passed = int(n)
                else:
                    out.validations_failed = int(n)
            elif kind == "drift":
                out.assumption_drift = int(total)
        return out

    def window(self, seconds: float = DAY_S, *, now: float | None = None) -> WindowStats:
        """Totals over the `seconds` up to `now` (the rolling day up to the clock's now by default)."""
        end = self.clock() if now is None else now
        rows = self._rows("SELECT kind, label, SUM(value), COUNT(*) FROM sample WHERE ts > ? AND ts <= ? "
                          "GROUP BY kind, label", (end - seconds, end))
        return self._fill(WindowStats(), rows)

    def days(self, n: int = 7) -> list[DayStats]:
        """Per calendar day (UTC), newest first, the last `n` days that have samples."""
        rows = self._rows(
            "SELECT date(ts, 'unixepoch') AS day, kind, label, SUM(value), COUNT(*) FROM sample "
            "WHERE ts >= ? GROUP BY day, kind, label ORDER BY day DESC",
            (self.clock() - n * DAY_S,))
        per: dict[str, list[tuple]] = {}
        for day, *rest in rows:
            per.setdefault(day, []).append(tuple(rest))
        return [self._fill(DayStats(day=day), r) for day, r in per.items()]  # type: ignore[misc]

    def alerts(self) -> Iterator[dict[str, Any]]:
        for name, firing, changed_at, message in self._rows("SELECT name, firing, changed_at, message FROM alert"):
            yield {"name": name, "firing": bool(firing), "changed_at": changed_at, "message": message}

    def collector(self) -> Any:
        """A prometheus_client collector that reads the store at every scrape."""
        from prometheus_client.core import GaugeMetricFamily

        store = self

        class _Collector:
            def collect(self) -> Iterator[Any]:
                w = store.window()
                c = GaugeMetricFamily("lagoon_stats_classifications", "Task classifications in the rolling day",
                                      labels=["type"])
                for t in ("reasoning_bound", "retrieval_bound"):
                    c.add_metric([t], w.classifications.get(t, 0))
                yield c
                yield GaugeMetricFamily("lagoon_stats_reasoning_share", "Reasoning-bound share of the rolling day",
                                        value=w.reasoning_share)
                v = GaugeMetricFamily("lagoon_stats_validations", "Context validations in the rolling day",
                                      labels=["passed"])
                v.add_metric(["true"], w.validations_passed)
                v.add_metric(["false"], w.validations_failed)
                yield v
                rate = w.validation_pass_rate
                yield GaugeMetricFamily("lagoon_stats_validation_pass_rate",
                                        "Share of context validations that passed in the rolling day",
                                        value=float("nan") if rate is None else rate)
                yield GaugeMetricFamily("lagoon_stats_assumption_drift",
                                        "Assumptions found no longer true in the rolling day", value=w.assumption_drift)
                a = GaugeMetricFamily("lagoon_stats_alert_firing", "1 while the named alert fires", labels=["name"])
                for alert in store.alerts():
                    a.add_metric([alert["name"]], float(alert["firing"]))
                yield a

        return _Collector()
