"""Metrics against independent references: Wilson by its textbook values, pass@k by enumeration."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from lagoon.eval.metrics import SUMMARY_FORMAT_VERSION, pass_at_k, summarize, wilson_interval


def test_wilson_matches_published_values():
    # Newcombe (1998), table I: 81/263 -> 0.2553-0.3662; 15/148 -> 0.0624-0.1605.
    lo, hi = wilson_interval(81, 263)
    assert lo == pytest.approx(0.2553, abs=5e-4) and hi == pytest.approx(0.3662, abs=5e-4)
    lo, hi = wilson_interval(15, 148)
    assert lo == pytest.approx(0.0624, abs=5e-4) and hi == pytest.approx(0.1605, abs=5e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and 0.6 < lo < 0.75


def test_pass_at_k_equals_enumeration_over_subsets():
    rng = random.Random(3)
    for _ in range(40):
        n = rng.randint(1, 8)
        c = rng.randint(0, n)
        k = rng.randint(1, n)
        outcomes = [True] * c + [False] * (n - c)
        subsets = list(itertools.combinations(outcomes, k))
        brute = sum(any(s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def _row(task, passed, attempt=0, **kw):
    base = {
        "task_id": task, "attempt": attempt, "agent": "lagoon", "format": "tb2", "status": "passed" if passed else "failed",
        "passed": passed, "category": kw.pop("category", "python"), "steps": 3,
        "commands": [{"command": "a", "exit_code": 0}, {"command": "b", "exit_code": 1}],
        "tokens": {"input": 90, "output": 10, "total": 100}, "cost_usd": 0.02, "latency_ms": 1000.0,
        "validation_failures": 1, "backends": {"open": 2, "proprietary": 1},
    }
    base.update(kw)
    return base


def test_summarize_composite_numbers():
    rows = [
        _row("a", True), _row("a", False, attempt=1),
        _row("b", False), _row("b", False, attempt=1, latency_ms=3000.0),
        _row("c", True, category="shell"), _row("c", True, attempt=1, category="shell", cost_usd=0.06),
        {"task_id": "d", "attempt": 0, "agent": "lagoon", "format": "tb2", "status": "environment_unsupported", "passed": False},
    ]
    s = summarize(rows, fidelity={"sqnr_db": 31.2})
    assert s["format_version"] == SUMMARY_FORMAT_VERSION
    assert s["scored"] == 6 and s["passed"] == 3 and s["pass_rate"] == 0.5
    assert s["environment_unsupported"] == ["d"]
    assert s["pass_rate_ci95"] == list(wilson_interval(3, 6))
    assert s["pass_at_k"]["1"] == pytest.approx((0.5 + 0 + 1) / 3)
    assert s["pass_at_k"]["2"] == pytest.approx((1 + 0 + 1) / 3)
    assert s["command_success_rate"] == 0.5
    assert s["cost_usd"]["total"] == pytest.approx(0.16)
    assert s["cost_usd"]["per_solved_task"] == pytest.approx(0.16 / 3)
    assert s["latency_ms"]["p50"] == 1000.0 and s["latency_ms"]["p95"] == pytest.approx(2500.0)
    assert s["routing_share"] == {"open": pytest.approx(2 / 3), "proprietary": pytest.approx(1 / 3)}
    assert s["by_category"]["shell"]["pass_rate"] == 1.0
    assert s["validation_failures"]["total"] == 6
    assert s["fidelity"] == {"sqnr_db": 31.2}
    assert math.isclose(s["steps"]["mean"], 3.0)


def test_summarize_empty():
    s = summarize([])
    assert s["pass_rate"] is None and s["pass_at_k"] == {} and s["routing_share"] == {}


def test_a_dead_or_misspelled_field_is_an_error_not_a_silent_zero():
    from lagoon.errors import TaskSpecError
    from lagoon.eval import TrialResult

    with pytest.raises(TaskSpecError, match="'expert_loads'"):
        summarize([_row("a", True, expert_loads=[1, 2])])
    r = TrialResult.from_row(_row("a", True))
    with pytest.raises(ValueError, match="expert_loads"):
        r.expert_loads = [1, 2]  # type: ignore[attr-defined]
    assert summarize([_row("a", True, expert_load=[3, 1]), _row("b", False, expert_load=[1, 1])])["expert_load"] == [4, 2]

