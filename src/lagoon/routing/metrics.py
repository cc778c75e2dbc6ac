"""Routing telemetry: what the router counts, on top of `lagoon.telemetry.Telemetry`.

Metrics (Prometheus names; the per-call GenAI span and `lagoon_model_calls_total`,
`lagoon_model_call_duration_seconds`, `lagoon_tokens_total` come from each backend's
`Telemetry.model_call_span`):

    lagoon_routing_classifications_total{type, decided_by}   each classification (when
                                                            telemetry.enable_task_classification_logging)
    lagoon_routing_reasoning_share                           reasoning-bound share over the rolling day
    lagoon_alerts_total{name="reasoning_share"}              raised when the share crosses
                                                            telemetry.reasoning_share_alert (seed pitfall 3)
    lagoon_routing_backend_calls_total{backend, outcome}     outcome: ok | retryable_error | fatal_error
    lagoon_routing_backend_errors_total{backend, error}
    lagoon_routing_backend_latency_seconds{backend}          histogram, successful calls
    lagoon_routing_backend_tokens_total{backend, type}
    lagoon_routing_backend_cost_usd_total{backend}
    lagoon_routing_breaker_state{backend}                    0 closed, 1 half-open, 2 open
    lagoon_routing_retries_total{backend}
    lagoon_routing_fallbacks_total{reason}
    lagoon_validation_total{passed}, lagoon_validation_pass_rate     from the agent
    lagoon_assumption_drift_total, lagoon_assumption_drift_last      from the agent

The share alert needs `MIN_SAMPLES` classifications in the window (one task is not a distribution),
fires once when the share goes above the limit, and re-arms when it drops back to or below it.
Given a `lagoon.stats.StatsStore` (what `build_router` passes unless `telemetry.persist_stats` is
off), classifications, validations and drift are also recorded there and the window, the share and
the alert's state are the store's: every process's calls count, and only one of them fires.
This module holds no secrets and logs names and numbers only.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from lagoon.config import TelemetrySection
from lagoon.protocols import Classification, TaskType, Usage
from lagoon.routing.breaker import STATE_VALUE, BreakerState
from lagoon.stats import StatsStore
from lagoon.telemetry import Telemetry

__all__ = ["RoutingTelemetry", "MIN_SAMPLES", "WINDOW_S"]

log = logging.getLogger("lagoon.routing")

WINDOW_S = 86_400.0
MIN_SAMPLES = 10


class RoutingTelemetry:
    def __init__(
        self,
        telemetry: Telemetry,
        config: TelemetrySection | None = None,
        clock: Callable[[], float] = time.time,
        store: StatsStore | None = None,
    ) -> None:
        self.telemetry = telemetry
        self.store = store
        self.config = config or telemetry.config
        self._clock = clock
        self._lock = threading.Lock()
        self._window: deque[tuple[float, bool]] = deque()
        self._reasoning_in_window = 0
        self._alerting = False
        self._validations = [0, 0]  # passed, total

    # ------------------------------------------------------------------ classification
    def record_classification(self, c: Classification, *, prompt_chars: int, context_size: int) -> None:
        if self.config.enable_task_classification_logging:
            log.info(
                "classified task: type=%s confidence=%.2f decided_by=%s prompt_chars=%d context_size=%d",
                c.type.value, c.confidence, c.decided_by, prompt_chars, context_size,
            )
            self.telemetry.inc(
                "lagoon_routing_classifications_total",
                labels={"type": c.type.value, "decided_by": c.decided_by},
                doc="Task classifications by type and deciding rule",
            )
        self._update_share(c.type is TaskType.REASONING_BOUND)

    def reasoning_share(self) -> float:
        if self.store is not None:
            return self.store.window(WINDOW_S, now=self._clock()).reasoning_share
        with self._lock:
            self._expire()
            return self._reasoning_in_window / len(self._window) if self._window else 0.0

    def _expire(self) -> None:
        cutoff = self._clock() - WINDOW_S
        while self._window and self._window[0][0] < cutoff:
            _, was_reasoning = self._window.popleft()
            self._reasoning_in_window -= was_reasoning

    def _update_share(self, is_reasoning: bool) -> None:
        limit = self.config.reasoning_share_alert
        if self.store is not None:
            self._update_shared_share(is_reasoning, limit)
            return
        with self._lock:
            self._window.append((self._clock(), is_reasoning))
            self._reasoning_in_window += is_reasoning
            self._expire()
            n = len(self._window)
            share = self._reasoning_in_window / n
            fire = n >= MIN_SAMPLES and share > limit and not self._alerting
            if share <= limit:
                self._alerting = False
            if fire:
                self._alerting = True
        self.telemetry.set("lagoon_routing_reasoning_share", share, doc="Reasoning-bound share over the rolling day")
        if fire:
            self.telemetry.alert(
                "reasoning_share",
                f"reasoning-bound tasks are {share:.0%} of the last {n} in the rolling day (limit {limit:.0%}); "
                "review routing thresholds and model budgets",
            )

    def _update_shared_share(self, is_reasoning: bool, limit: float) -> None:
        assert self.store is not None
        now = self._clock()
        self.store.record("classification", "reasoning_bound" if is_reasoning else "retrieval_bound", at=now)
        w = self.store.window(WINDOW_S, now=now)
        share, n = w.reasoning_share, w.tasks
        self.telemetry.set("lagoon_routing_reasoning_share", share, doc="Reasoning-bound share over the rolling day")
        message = (f"reasoning-bound tasks are {share:.0%} of the last {n} in the rolling day (limit {limit:.0%}); "
                   "review routing thresholds and model budgets")
        if share <= limit:
            self.store.transition("reasoning_share", False)
        elif n >= MIN_SAMPLES and self.store.transition("reasoning_share", True, message):
            self.telemetry.alert("reasoning_share", message)

    # ------------------------------------------------------------------ backends
    def record_call(self, backend: str, *, latency_s: float, usage: Usage) -> None:
        t = self.telemetry
        t.inc("lagoon_routing_backend_calls_total", labels={"backend": backend, "outcome": "ok"}, doc="Backend calls by outcome")
        t.observe("lagoon_routing_backend_latency_seconds", latency_s, {"backend": backend}, "Backend call latency")
        for kind, n in (("input", usage.input_tokens), ("output", usage.output_tokens)):
            if n:
                t.inc("lagoon_routing_backend_tokens_total", n, {"backend": backend, "type": kind}, "Tokens per backend")
        if usage.cost_usd:
            t.inc("lagoon_routing_backend_cost_usd_total", usage.cost_usd, {"backend": backend}, "USD per backend")

    def record_error(self, backend: str, error: BaseException, *, retryable: bool) -> None:
        outcome = "retryable_error" if retryable else "fatal_error"
        t = self.telemetry
        t.inc("lagoon_routing_backend_calls_total", labels={"backend": backend, "outcome": outcome}, doc="Backend calls by outcome")
        t.inc(
            "lagoon_routing_backend_errors_total",
            labels={"backend": backend, "error": type(error).__name__},
            doc="Backend errors by type",
        )

    def record_retry(self, backend: str) -> None:
        self.telemetry.inc("lagoon_routing_retries_total", labels={"backend": backend}, doc="Retries per backend")

    def record_fallback(self, reason: str) -> None:
        self.telemetry.inc("lagoon_routing_fallbacks_total", labels={"reason": reason}, doc="Fallbacks by reason")

    def record_breaker(self, backend: str, old: BreakerState, new: BreakerState) -> None:
        self.telemetry.set(
            "lagoon_routing_breaker_state", STATE_VALUE[new], {"backend": backend}, "Breaker: 0 closed, 1 half-open, 2 open"
        )
        log.warning("circuit breaker for %s: %s -> %s", backend, old.value, new.value)

    # ------------------------------------------------------------------ agent hooks
    def record_validation(self, passed: bool) -> None:
        """The agent validated a context snapshot (counts the pass rate)."""
        if not self.config.enable_assumption_drift_tracking:
            return
        if self.store is not None:
            self.store.record("validation", "passed" if passed else "failed", at=self._clock())
        with self._lock:
            self._validations[0] += bool(passed)
            self._validations[1] += 1
            rate = self._validations[0] / self._validations[1]
        self.telemetry.inc("lagoon_validation_total", labels={"passed": str(bool(passed)).lower()}, doc="Validations")
        self.telemetry.set("lagoon_validation_pass_rate", rate, doc="Share of validations that passed")

    def record_assumption_drift(self, n: int) -> None:
        """The agent found `n` assumptions that no longer hold."""
        if not self.config.enable_assumption_drift_tracking:
            return
        if n < 0:
            raise ValueError("assumption drift is a count of assumptions (>= 0)")
        if self.store is not None and n:
            self.store.record("drift", value=n, at=self._clock())
        self.telemetry.inc("lagoon_assumption_drift_total", n, doc="Assumptions found no longer true")
        self.telemetry.set("lagoon_assumption_drift_last", n, doc="Drifted assumptions at the last check")
