"""The router over deterministic backends: breaker transitions, retries, fallbacks, the
context-window check, task-level classification, and the reasoning-share alert."""

import logging
import subprocess
import sys

import pytest

from lagoon.config import LagoonConfig, load_config
from lagoon.errors import (
    AuthenticationError,
    BackendUnavailableError,
    CircuitOpenError,
    ConfigError,
    ContextWindowExceededError,
    NoBackendAvailableError,
    RateLimitError,
)
from lagoon.protocols import ChatMessage, TaskType
from lagoon.routing import BreakerState, build_router
from lagoon.routing.metrics import MIN_SAMPLES
from lagoon.testing import ScriptedChatModel


class Faulty:
    """A ChatModel that raises the queued errors first, then answers like its inner model."""

    def __init__(self, name, errors=(), window=32768):
        self.inner = ScriptedChatModel.of(["ok from " + name], name=name, repeat_last=True, window=window)
        self.name = name
        self.errors = list(errors)
        self.calls = 0

    @property
    def context_window(self):
        return self.inner.context_window

    def count_tokens(self, messages):
        return self.inner.count_tokens(messages)

    def chat(self, messages, **kw):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.inner.chat(messages, **kw)


def make(cfg=None, cheap=None, strong=None, **overrides):
    cfg = cfg or load_config({"routing": {"backoff_base_s": 0.0, **overrides}})
    cheap = cheap or Faulty("cheap")
    strong = strong or Faulty("strong")
    router = build_router(cfg, backends={"retrieval_bound": cheap, "reasoning_bound": strong})
    router.slept = []
    router._sleep = router.slept.append
    return router, cheap, strong


FIX = [ChatMessage("user", "fix the failing lint test")]  # 3 retrieval hits → confident RETRIEVAL_BOUND
DESIGN = [ChatMessage("user", "design and architect a plugin system, then refactor")]


def test_routes_by_classification_and_reports_why():
    router, cheap, strong = make()
    r = router.chat(FIX)
    assert r.backend == "retrieval_bound" and r.message.content == "ok from cheap"
    assert r.route.to_dict()["classification"]["type"] == "RETRIEVAL_BOUND" and r.route.to_dict()["fallbacks"] == []
    assert router.chat(DESIGN).backend == "reasoning_bound"
    low = router.chat([ChatMessage("user", "fix it")])  # confidence 0.5 → safe side
    assert low.backend == "reasoning_bound" and low.route.to_dict()["classification"]["decided_by"].startswith("safe_side")


def test_set_task_classifies_once_for_all_calls():
    router, cheap, strong = make()
    c = router.set_task("fix the failing lint test", context_size=100)
    assert c.type is TaskType.RETRIEVAL_BOUND
    for text in ["now design a whole new architecture", "refactor everything"]:
        r = router.chat([ChatMessage("user", text)])
        assert r.backend == "retrieval_bound" and r.route.to_dict()["classification"]["source"] == "task"
    assert router.telemetry.value(
        "lagoon_routing_classifications_total", {"type": "RETRIEVAL_BOUND", "decided_by": "lexical:keywords"}
    ) == 1
    router.clear_task()
    assert router.chat(DESIGN).backend == "reasoning_bound"


def test_retries_with_backoff_then_succeeds():
    cheap = Faulty("cheap", [BackendUnavailableError("503"), BackendUnavailableError("503")])
    router, *_ = make(cheap=cheap, max_retries=2, backoff_base_s=0.1)
    r = router.chat(FIX)
    assert r.backend == "retrieval_bound" and r.route.to_dict()["retries"] == 2 and cheap.calls == 3
    assert len(router.slept) == 2 and 0.05 <= router.slept[0] <= 0.15 and 0.1 <= router.slept[1] <= 0.3
    assert router.telemetry.value("lagoon_routing_retries_total", {"backend": "retrieval_bound"}) == 2


def test_retry_after_wins_and_a_long_one_falls_back():
    cheap = Faulty("cheap", [RateLimitError("429", retry_after=0.7)])
    router, *_ = make(cheap=cheap)
    assert router.chat(FIX).backend == "retrieval_bound" and router.slept == [0.7]
    cheap = Faulty("cheap", [RateLimitError("429", retry_after=120.0)])
    router, _, strong = make(cheap=cheap, max_retry_after_s=30.0)
    r = router.chat(FIX)
    assert r.backend == "reasoning_bound" and router.slept == []
    assert r.route.to_dict()["fallbacks"][0]["reason"] == "retry_after_too_long:RateLimitError"


def test_breaker_opens_half_opens_and_closes(monkeypatch):
    now = [1000.0]
    cfg = load_config({"routing": {"backoff_base_s": 0.0, "max_retries": 0, "breaker_fail_max": 2, "fallback": False},
                       "validation": {"circuit_breaker_timeout_ms": 5000}})
    cheap = Faulty("cheap", [BackendUnavailableError("down")] * 3)
    router, *_ = make(cfg, cheap=cheap)
    breaker = router.breakers["retrieval_bound"]
    breaker._clock = lambda: now[0]
    for _ in range(2):
        with pytest.raises(NoBackendAvailableError):
            router.chat(FIX)
    assert breaker.state is BreakerState.OPEN
    assert router.telemetry.value("lagoon_routing_breaker_state", {"backend": "retrieval_bound"}) == 2
    with pytest.raises(CircuitOpenError) as info:  # open: the backend is not even called
        router.chat(FIX)
    assert cheap.calls == 2 and 0 < info.value.retry_after <= 5.0
    now[0] += 5.0
    assert breaker.state is BreakerState.HALF_OPEN
    with pytest.raises(NoBackendAvailableError):  # the trial fails → open again
        router.chat(FIX)
    assert breaker.state is BreakerState.OPEN and cheap.calls == 3
    now[0] += 5.0
    assert router.chat(FIX).backend == "retrieval_bound"  # the trial succeeds → closed
    assert breaker.state is BreakerState.CLOSED
    assert [(a.value, b.value) for a, b in breaker.state_changes] == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "open"), ("open", "half_open"), ("half_open", "closed")
    ]


def test_breaker_timeout_comes_from_validation_config():
    cfg = load_config({"validation": {"circuit_breaker_timeout_ms": 1234}, "routing": {"breaker_fail_max": 7}})
    router, *_ = make(cfg)
    assert router.breakers["reasoning_bound"].reset_timeout_s == pytest.approx(1.234)
    assert router.breakers["reasoning_bound"].fail_max == 7


def test_fallback_when_open_or_failing_and_not_when_disabled():
    cheap = Faulty("cheap", [BackendUnavailableError("down")] * 10)
    router, _, strong = make(cheap=cheap, max_retries=1, breaker_fail_max=2)
    r = router.chat(FIX)
    assert r.backend == "reasoning_bound" and r.route.to_dict()["chosen"] == "retrieval_bound"
    assert r.route.to_dict()["fallbacks"] == [{"from": "retrieval_bound", "to": "reasoning_bound", "reason": "error:BackendUnavailableError"}]
    r = router.chat(FIX)  # now open: skipped without a call
    assert r.route.to_dict()["fallbacks"][0]["reason"] == "circuit_open" and cheap.calls == 2
    assert router.telemetry.value("lagoon_routing_fallbacks_total", {"reason": "circuit_open"}) == 1
    cheap = Faulty("cheap", [BackendUnavailableError("down")])
    router, *_ = make(cheap=cheap, max_retries=0, fallback=False)
    with pytest.raises(NoBackendAvailableError) as info:
        router.chat(FIX)
    assert info.value.attempts[0]["outcome"] == "BackendUnavailableError"


def test_fatal_errors_are_not_retried():
    cheap = Faulty("cheap", [AuthenticationError("CHEAP_KEY is not set")])
    router, *_ = make(cheap=cheap, max_retries=3)
    r = router.chat(FIX)
    assert cheap.calls == 1 and r.route.to_dict()["retries"] == 0 and r.backend == "reasoning_bound"


def test_context_window_checked_before_every_call_including_fallbacks():
    big = [ChatMessage("user", "fix the failing lint test " + "word " * 3000)]
    cfg = load_config({"routing": {"retrieval_bound": {"max_tokens": 100}, "reasoning_bound": {"max_tokens": 100}}})
    small, large = Faulty("cheap", window=1024), Faulty("strong", window=8192)
    router, *_ = make(cfg, cheap=small, strong=large)
    r = router.chat(big)
    assert r.backend == "reasoning_bound" and small.calls == 0
    assert r.route.to_dict()["fallbacks"][0]["reason"] == "context_window"
    huge = [ChatMessage("user", "fix the failing lint test " + "word " * 9000)]
    with pytest.raises(ContextWindowExceededError) as info:
        router.chat(huge)
    assert large.calls == 1 and info.value.needed > 8192
    assert router.context_window == 8192


def test_backend_keys_are_validated():
    with pytest.raises(ConfigError, match="valid keys"):
        build_router(LagoonConfig(), backends={"cheap": ScriptedChatModel.of(["x"])})


def test_reasoning_share_alert_past_the_limit(caplog):
    router, *_ = make()
    caplog.set_level(logging.WARNING, "lagoon.telemetry")
    for _ in range(6):
        router.classify("fix the failing lint test")
    for _ in range(MIN_SAMPLES - 6):
        router.classify("design and architect it")  # 4/10 = 40%: not past the limit
    assert router.telemetry.value("lagoon_alerts_total", {"name": "reasoning_share"}) is None
    router.classify("design and architect it")  # 5/11 > 40%
    assert router.telemetry.value("lagoon_alerts_total", {"name": "reasoning_share"}) == 1
    assert router.telemetry.value("lagoon_routing_reasoning_share") == pytest.approx(5 / 11)
    assert any("ALERT reasoning_share" in rec.message for rec in caplog.records)
    router.classify("design and architect it")  # still above: no second alert until it re-arms
    assert router.telemetry.value("lagoon_alerts_total", {"name": "reasoning_share"}) == 1


def test_alert_threshold_and_logging_flags_come_from_config():
    cfg = load_config({"telemetry": {"reasoning_share_alert": 0.9, "enable_task_classification_logging": False}})
    router, *_ = make(cfg)
    for _ in range(MIN_SAMPLES):
        router.classify("design and architect it")
    assert router.telemetry.value("lagoon_alerts_total", {"name": "reasoning_share"}) == 1  # 100% > 90%
    assert router.telemetry.value(
        "lagoon_routing_classifications_total", {"type": "REASONING_BOUND", "decided_by": "lexical:keywords"}
    ) is None


def test_rolling_day_window_expires_old_classifications():
    router, *_ = make()
    now = [0.0]
    router.metrics._clock = lambda: now[0]
    router.classify("design and architect it")
    now[0] += 86_401
    router.classify("fix the failing lint test")
    assert router.metrics.reasoning_share() == 0.0


def test_validation_and_drift_hooks():
    from lagoon.protocols import RoutedModel

    router, cheap, _ = make()
    assert isinstance(router, RoutedModel) and not isinstance(cheap, RoutedModel)  # the agent's seam
    router.record_validation(True)
    router.record_validation(False)
    router.record_assumption_drift(3)
    t = router.telemetry
    assert t.value("lagoon_validation_pass_rate") == 0.5 and t.value("lagoon_assumption_drift_total") == 3
    off, *_ = make(load_config({"telemetry": {"enable_assumption_drift_tracking": False}}))
    off.record_validation(True)
    off.record_assumption_drift(2)
    assert off.telemetry.value("lagoon_validation_pass_rate") is None
    assert off.telemetry.value("lagoon_assumption_drift_total") is None


def test_routing_imports_and_routes_without_torch():
    code = (
        "import sys; from lagoon.config import LagoonConfig; from lagoon.routing import build_router; "
        "r = build_router(LagoonConfig()); r.classify('fix the lint'); r.context_window; "
        "from lagoon.protocols import ChatMessage; r.count_tokens([ChatMessage('user', 'x')]); "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_api_is_complete():
    import lagoon.routing as routing

    assert all(hasattr(routing, name) for name in routing.__all__)
    assert {"build_router", "build_backend", "Router"} <= set(routing.__all__)
