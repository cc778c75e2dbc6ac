"""CircuitBreaker state machine on a fake clock."""

import pytest

from lagoon.routing.breaker import BreakerState, CircuitBreaker


def make(**kw):
    now = [0.0]
    seen = []
    b = CircuitBreaker("b", clock=lambda: now[0], on_change=lambda name, old, new: seen.append((name, old, new)), **kw)
    return b, now, seen


def test_consecutive_failures_open_and_a_success_resets_the_count():
    b, now, seen = make(fail_max=3, reset_timeout_s=10)
    b.record_failure()
    b.record_failure()
    b.record_success()
    b.record_failure()
    b.record_failure()
    assert b.state is BreakerState.CLOSED and b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN and not b.allow()
    assert b.retry_after() == pytest.approx(10)
    assert seen == [("b", BreakerState.CLOSED, BreakerState.OPEN)]


def test_half_open_lets_exactly_one_trial_through():
    b, now, _ = make(fail_max=1, reset_timeout_s=5)
    b.record_failure()
    now[0] = 4.9
    assert not b.allow()
    now[0] = 5.0
    assert b.state is BreakerState.HALF_OPEN
    assert b.allow() and not b.allow()  # the trial is in flight: others wait
    b.release()  # the trial never reached the backend: the slot is free again
    assert b.allow()
    b.record_failure()
    assert b.state is BreakerState.OPEN and b.retry_after() == pytest.approx(5)
    now[0] = 10.0
    assert b.allow()
    b.record_success()
    assert b.state is BreakerState.CLOSED and b.allow() and b.allow()


def test_zero_timeout_goes_half_open_at_once_and_bad_fail_max_is_refused():
    b, _, _ = make(fail_max=1, reset_timeout_s=0)
    b.record_failure()
    assert b.state is BreakerState.HALF_OPEN
    with pytest.raises(ValueError):
        CircuitBreaker("x", fail_max=0)
