"""A circuit breaker per backend: closed → open → half-open → closed.

Contract:
- **closed**: calls pass. `fail_max` consecutive failures open it (a success resets the count).
- **open**: `allow()` is False until `reset_timeout_s` has passed since it opened; then the breaker
  turns **half-open** and lets exactly one trial call through (others are refused while it runs).
- **half-open**: the trial's success closes the breaker; its failure opens it again for another
  `reset_timeout_s`.

`state_changes` keeps every transition (for tests and the route report); `on_change` is called on
each one (the router uses it to set the breaker-state gauge). The clock is injectable so tests can
step time without sleeping. Thread-safe.

This is *not* a retry policy (the router owns retries) and it does not decide what counts as a
failure: the router calls `record_failure` for backend faults only, never for bad requests.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from enum import StrEnum

__all__ = ["BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: Gauge value per state (`lagoon_routing_breaker_state`).
STATE_VALUE = {BreakerState.CLOSED: 0, BreakerState.HALF_OPEN: 1, BreakerState.OPEN: 2}


class CircuitBreaker:
    def __init__(
        self,
        name: str,
        *,
        fail_max: int = 3,
        reset_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[str, BreakerState, BreakerState], None] | None = None,
    ) -> None:
        if fail_max < 1:
            raise ValueError("fail_max must be >= 1")
        self.name = name
        self.fail_max = fail_max
        self.reset_timeout_s = reset_timeout_s
        self._clock = clock
        self._on_change = on_change
        self._lock = threading.Lock()
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_in_flight = False
        self.state_changes: list[tuple[BreakerState, BreakerState]] = []

    # ------------------------------------------------------------------ queries
    @property
    def state(self) -> BreakerState:
        """Current state; an open breaker whose timeout has passed reads as half-open."""
        with self._lock:
            self._maybe_half_open()
            return self._state

    @property
    def failures(self) -> int:
        return self._failures

    def retry_after(self) -> float:
        """Seconds until an open breaker lets a trial through (0 when not open)."""
        with self._lock:
            if self._state is not BreakerState.OPEN:
                return 0.0
            return max(0.0, self._opened_at + self.reset_timeout_s - self._clock())

    # ------------------------------------------------------------------ protocol
    def allow(self) -> bool:
        """May a call go through now? In half-open, True once (for the trial) until it reports."""
        with self._lock:
            self._maybe_half_open()
            if self._state is BreakerState.CLOSED:
                return True
            if self._state is BreakerState.HALF_OPEN and not self._trial_in_flight:
                self._trial_in_flight = True
                return True
            return False

    def record_success(self) -> None:
        with self._lock:
            self._failures = 0
            self._trial_in_flight = False
            if self._state is not BreakerState.CLOSED:
                self._move(BreakerState.CLOSED)

    def record_failure(self) -> None:
        with self._lock:
            self._trial_in_flight = False
            self._failures += 1
            if self._state is BreakerState.HALF_OPEN or (
                self._state is BreakerState.CLOSED and self._failures >= self.fail_max
            ):
                self._opened_at = self._clock()
                self._move(BreakerState.OPEN)

    def release(self) -> None:
        """Give back a half-open trial slot without a verdict (the call never reached the backend)."""
        with self._lock:
            self._trial_in_flight = False

    # ------------------------------------------------------------------ internals
    def _maybe_half_open(self) -> None:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.reset_timeout_s:
            self._move(BreakerState.HALF_OPEN)

    def _move(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        self.state_changes.append((old, new))
        if self._on_change is not None:
            self._on_change(self.name, old, new)

    def __repr__(self) -> str:
        return f"CircuitBreaker({self.name!r}, state={self._state.value}, failures={self._failures})"
