"""The router: a `ChatModel` that wraps two chat models and sends each task to the one that fits.

Per `chat` call:

1. **Classify** — by the task set with `set_task(prompt, context_size)` (one classification per agent
   task, however many calls it makes), else by this call's last user message with the other
   messages' characters as the context size. Below `classification.confidence_threshold` the task
   goes to `classification.safe_side`.
2. **Order** — the chosen route first (`retrieval_bound` or `reasoning_bound`), then the other one
   when `router.fallback` is on.
3. **For each backend**: check the prompt + completion fits its context window (before *every* call,
   fallbacks included) → ask its circuit breaker → call it. A retryable error is retried up to
   `router.max_retries` times after a jittered exponential backoff (`backoff_base_s` · 2^n · U(0.5,
   1.5)); a `Retry-After` from the peer replaces the backoff, unless it exceeds
   `router.max_retry_after_s`, when the router falls back at once. A fatal error moves straight on.
4. The reply's `backend` is the route key that answered; `route` tells the story: classification,
   chosen route, attempts, retries, fallbacks with reasons, and `notes` (e.g. a context window the
   backend had to assume because the server would not say).

When nothing answers: every backend too small → `ContextWindowExceededError` (the agent can trim);
only open breakers → `CircuitOpenError` (retry later); otherwise `NoBackendAvailableError` with the
attempts. Breakers count backend faults (retryable errors, rejected keys); a request the backend
refused as malformed or too long proves it is up and counts as a success.

A Router serves one task at a time (`set_task` is per router, not per thread). It is *not* a load
balancer and never calls a model to classify.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from lagoon.config import LagoonConfig, RouteSection
from lagoon.errors import (
    AuthenticationError,
    BadRequestError,
    CircuitOpenError,
    ConfigError,
    ContextWindowExceededError,
    LagoonError,
    NoBackendAvailableError,
    RetryableError,
)
from lagoon.protocols import (
    ChatMessage,
    ChatModel,
    ChatResponse,
    Classification,
    Classifier,
    RouteAttempt,
    RouteFallback,
    RouteReport,
    TaskType,
    ToolSpec,
    WindowReporting,
)
from lagoon.routing.backends.base import estimate_tokens
from lagoon.routing.breaker import BreakerState, CircuitBreaker
from lagoon.routing.classify import apply_safe_side
from lagoon.routing.metrics import RoutingTelemetry
from lagoon.stats import StatsStore
from lagoon.telemetry import Telemetry

__all__ = ["Router", "ROUTES"]

log = logging.getLogger("lagoon.routing")

ROUTES = ("retrieval_bound", "reasoning_bound")
_ROUTE_OF = {TaskType.RETRIEVAL_BOUND: "retrieval_bound", TaskType.REASONING_BOUND: "reasoning_bound"}


class Router:
    name = "router"

    def __init__(
        self,
        backends: Mapping[str, ChatModel],
        classifier: Classifier,
        config: LagoonConfig | None = None,
        telemetry: Telemetry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        stats: StatsStore | None = None,
    ) -> None:
        unknown = set(backends) - set(ROUTES)
        missing = set(ROUTES) - set(backends)
        if unknown or missing:
            raise ConfigError(
                f"router backends must be keyed by {', '.join(ROUTES)}; "
                f"unknown: {sorted(unknown) or 'none'}, missing: {sorted(missing) or 'none'}"
            )
        self.config = config or LagoonConfig()
        self.backends = dict(backends)
        self.classifier = classifier
        self.telemetry = telemetry or Telemetry(self.config.telemetry)
        self.metrics = RoutingTelemetry(self.telemetry, self.config.telemetry, store=stats)
        self._sleep = sleep
        self._rng = rng or random.Random()
        timeout_s = self.config.validation.circuit_breaker_timeout_ms / 1000.0
        self.breakers = {
            key: CircuitBreaker(
                key,
                fail_max=self.config.router.breaker_fail_max,
                reset_timeout_s=timeout_s,
                clock=clock,
                on_change=self.metrics.record_breaker,
            )
            for key in ROUTES
        }
        for key in ROUTES:
            self.telemetry.set("lagoon_routing_breaker_state", 0, {"backend": key}, "Breaker: 0 closed, 1 half-open, 2 open")
        self._task: Classification | None = None

    # ------------------------------------------------------------------ classification
    def classify(self, prompt: str, context_size: int = 0) -> Classification:
        """Classify a task (safe side applied) and record it in telemetry."""
        c = apply_safe_side(self.classifier.classify(prompt, context_size), self.config.classification)
        self.metrics.record_classification(c, prompt_chars=len(prompt), context_size=context_size)
        return c

    def set_task(self, prompt: str, context_size: int = 0) -> Classification:
        """Classify the agent's task once; every later `chat` routes by it until `clear_task`.

        `context_size` is in characters (of the retrieved context), as the seed measures it and as
        `classification.context_size_threshold` is written."""
        self._task = self.classify(prompt, context_size)
        return self._task

    def clear_task(self) -> None:
        self._task = None

    @property
    def task(self) -> Classification | None:
        return self._task

    def route_for(self, c: Classification) -> list[str]:
        """Route keys to try, in order, for a classification."""
        first = _ROUTE_OF[c.type]
        other = next(k for k in ROUTES if k != first)
        return [first, other] if self.config.router.fallback else [first]

    def _classify_messages(self, messages: Sequence[ChatMessage]) -> tuple[Classification, str]:
        if self._task is not None:
            return self._task, "task"
        users = [i for i, m in enumerate(messages) if m.role == "user"]
        last = users[-1] if users else len(messages) - 1
        prompt = messages[last].content
        context = sum(len(m.content) for i, m in enumerate(messages) if i != last)
        return self.classify(prompt, context), "message"

    # ------------------------------------------------------------------ ChatModel
    @property
    def context_window(self) -> int:
        """The largest window among the backends (a prompt the primary can't fit falls back)."""
        return max(b.context_window for b in self.backends.values())

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Tokens by the backend the current task would use first (the larger count without a task)."""
        if self._task is not None:
            return self.backends[_ROUTE_OF[self._task.type]].count_tokens(messages)
        return max(b.count_tokens(messages) for b in self.backends.values())

    def _route_config(self, key: str) -> RouteSection:
        return getattr(self.config.router, key)

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatResponse:
        if not messages:
            raise ValueError("chat() needs at least one message")
        classification, source = self._classify_messages(messages)
        order = self.route_for(classification)
        report = RouteReport(classification, source, chosen=order[0])
        reasons: list[tuple[str, LagoonError | None]] = []
        for i, key in enumerate(order):
            if i > 0:
                reason = reasons[-1][0]
                report.fallbacks.append(RouteFallback(order[i - 1], key, reason))
                self.metrics.record_fallback(reason.split(":")[0])
                log.info("falling back from %s to %s: %s", order[i - 1], key, reason)
            response, reason, err = self._try_backend(key, messages, tools, max_tokens, temperature, report)
            if response is not None:
                report.backend = key
                report.backend_name = response.backend or self.backends[key].name
                return replace(response, backend=key, route=report)
            reasons.append((reason, err))
        raise self._exhausted(reasons, report)

    # ------------------------------------------------------------------ one backend
    def _try_backend(
        self,
        key: str,
        messages: Sequence[ChatMessage],
        tools: Sequence[ToolSpec],
        max_tokens: int | None,
        temperature: float | None,
        report: RouteReport,
    ) -> tuple[ChatResponse | None, str, LagoonError | None]:
        backend = self.backends[key]
        route = self._route_config(key)
        budget = route.max_tokens if max_tokens is None else max_tokens
        breaker = self.breakers[key]
        attempts = report.attempts
        routing = self.config.router
        for attempt in range(routing.max_retries + 1):
            try:
                window = backend.context_window
                needed = backend.count_tokens(messages) + estimate_tokens((), tools) + budget
            except LagoonError as exc:
                attempts.append(RouteAttempt(key, type(exc).__name__, str(exc)))
                return None, f"unusable:{type(exc).__name__}", exc
            if attempt == 0 and isinstance(backend, WindowReporting) and backend.window_note:
                report.notes.append(f"{key}: {backend.window_note}")
            if needed > window:
                attempts.append(RouteAttempt(key, "skipped", "context_window", needed=needed, window=window))
                err = ContextWindowExceededError(
                    f"{key}: prompt + completion need {needed} tokens, the window is {window}",
                    backend=key, needed=needed, window=window,
                )
                return None, "context_window", err
            if not breaker.allow():
                wait = breaker.retry_after()
                attempts.append(RouteAttempt(key, "skipped", "circuit_open", retry_after_s=round(wait, 3)))
                return None, "circuit_open", CircuitOpenError(f"{key}: circuit breaker open", backend=key, retry_after=wait)
            start = time.perf_counter()
            try:
                response = backend.chat(messages, tools=tools, max_tokens=max_tokens, temperature=temperature)
            except RetryableError as exc:
                breaker.record_failure()
                self.metrics.record_error(key, exc, retryable=True)
                entry = RouteAttempt(key, type(exc).__name__, str(exc))
                attempts.append(entry)
                if attempt == routing.max_retries or breaker.state is BreakerState.OPEN:
                    return None, f"error:{type(exc).__name__}", exc
                delay = self._delay(attempt, exc.retry_after)
                if delay is None:
                    entry.retry_after_s = exc.retry_after
                    return None, f"retry_after_too_long:{type(exc).__name__}", exc
                entry.waited_s = round(delay, 4)
                report.retries += 1
                self.metrics.record_retry(key)
                self._sleep(delay)
                continue
            except (ContextWindowExceededError, BadRequestError) as exc:
                breaker.record_success()  # the backend answered; the request was the problem
                self.metrics.record_error(key, exc, retryable=False)
                attempts.append(RouteAttempt(key, type(exc).__name__, str(exc)))
                kind = "context_window" if isinstance(exc, ContextWindowExceededError) else f"error:{type(exc).__name__}"
                return None, kind, exc
            except LagoonError as exc:
                if isinstance(exc, AuthenticationError):
                    breaker.record_failure()
                else:
                    breaker.release()
                self.metrics.record_error(key, exc, retryable=False)
                attempts.append(RouteAttempt(key, type(exc).__name__, str(exc)))
                return None, f"error:{type(exc).__name__}", exc
            except BaseException:
                breaker.release()
                raise
            breaker.record_success()
            latency = time.perf_counter() - start
            self.metrics.record_call(key, latency_s=latency, usage=response.usage)
            attempts.append(RouteAttempt(key, "ok", latency_s=round(latency, 4)))
            return response, "ok", None
        raise AssertionError("unreachable: the retry loop always returns")

    def _delay(self, attempt: int, retry_after: float | None) -> float | None:
        routing = self.config.router
        if retry_after is not None:
            return retry_after if retry_after <= routing.max_retry_after_s else None
        return routing.backoff_base_s * (2**attempt) * self._rng.uniform(0.5, 1.5)

    def _exhausted(self, reasons: list[tuple[str, LagoonError | None]], report: RouteReport) -> LagoonError:
        kinds = {r for r, _ in reasons}
        if kinds == {"context_window"}:
            errs = [e for _, e in reasons if isinstance(e, ContextWindowExceededError)]
            needed = max((e.needed or 0) for e in errs) if errs else None
            window = max((e.window or 0) for e in errs) if errs else None
            return ContextWindowExceededError(
                f"the prompt fits no backend ({'; '.join(str(e) for e in errs)}); trim the history or the retrieved context",
                needed=needed or None, window=window or None,
            )
        if kinds == {"circuit_open"}:
            wait = min(self.breakers[k].retry_after() for k in self.route_for_keys(report))
            return CircuitOpenError(
                f"every backend's circuit breaker is open; retry in {wait:.1f}s", retry_after=wait
            )
        summary = "; ".join(f"{a.backend}: {a.reason or a.outcome}" for a in report.attempts)
        return NoBackendAvailableError(f"no backend answered ({summary})", attempts=[a.to_dict() for a in report.attempts])

    def route_for_keys(self, report: RouteReport) -> list[str]:
        return [report.chosen] + [f.target for f in report.fallbacks]

    # ------------------------------------------------------------------ agent hooks
    def record_validation(self, passed: bool) -> None:
        """The agent reports a context validation (pass rate telemetry)."""
        self.metrics.record_validation(passed)

    def record_assumption_drift(self, n: int) -> None:
        """The agent reports how many assumptions drifted at a check."""
        self.metrics.record_assumption_drift(n)

    def __repr__(self) -> str:
        return f"Router({', '.join(f'{k}={b.name!r}' for k, b in self.backends.items())})"
