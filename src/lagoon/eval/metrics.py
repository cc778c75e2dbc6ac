"""Composite metrics over trial results: more than a pass rate (seed pitfall 7).

`summarize(results)` gives pass rate with a Wilson 95% interval, pass@k by the unbiased estimator
(Chen et al. 2021: 1 - C(n-c, k) / C(n, k) per task, averaged), trajectory length, terminal command
success rate (share of commands that exited 0), tokens, cost per task and per solved task, agent
latency p50/p95, validation failures, the share of model calls routed to each backend, the
breakdown by category and failure mode, and the quantized model's fidelity numbers when given.

Trials whose environment could not be built (``environment_unsupported``) are counted apart and
left out of every rate: they say nothing about the agent. This module is arithmetic only.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from lagoon.eval.result import TrialResult

__all__ = ["wilson_interval", "pass_at_k", "summarize", "SUMMARY_FORMAT_VERSION"]

SUMMARY_FORMAT_VERSION = 1


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (95% by default); (0, 1) when n = 0."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one task with `n` samples of which `c` passed."""
    if not 0 <= c <= n or k < 1 or k > n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (got n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def _pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(
    results: Iterable[TrialResult | Mapping[str, Any]], *, fidelity: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Aggregate trial results (see `trial.run_trial`; ``results.jsonl`` rows are read as
    `TrialResult`s) into one JSON-able summary."""
    rows = [r if isinstance(r, TrialResult) else TrialResult.from_row(r) for r in results]
    unsupported = [r for r in rows if not r.scored]
    scored = [r for r in rows if r.scored]
    passed = [r for r in scored if r.passed]
    lo, hi = wilson_interval(len(passed), len(scored))

    per_task: dict[str, list[bool]] = defaultdict(list)
    for r in scored:
        per_task[r.task_id].append(r.passed)
    n_min = min((len(v) for v in per_task.values()), default=0)
    pass_k = {
        str(k): float(np.mean([pass_at_k(len(v), sum(v), k) for v in per_task.values()]))
        for k in range(1, n_min + 1)
    }

    commands = [c for r in scored for c in r.commands if c.exit_code is not None]
    ok_commands = sum(1 for c in commands if c.exit_code == 0)
    steps = [float(r.steps) for r in scored]
    tokens = [float(r.tokens.total) for r in scored]
    costs = [r.cost_usd for r in scored]
    latency = [r.latency_ms for r in scored]
    backends: Counter[str] = Counter()
    for r in scored:
        backends.update(r.backends)
    calls = sum(backends.values())

    categories: dict[str, dict[str, Any]] = {}
    for cat in sorted({str(r.category) for r in scored}):
        group = [r for r in scored if str(r.category) == cat]
        k = sum(1 for r in group if r.passed)
        categories[cat] = {"n": len(group), "passed": k, "pass_rate": k / len(group), "ci95": wilson_interval(k, len(group))}

    expert_load = None
    loads = [np.asarray(r.expert_load, dtype=float) for r in scored if r.expert_load]
    if loads and len({x.shape for x in loads}) == 1:
        expert_load = np.sum(loads, axis=0).tolist()

    return {
        "format_version": SUMMARY_FORMAT_VERSION,
        "agents": sorted({r.agent for r in rows}),
        "trials": len(rows),
        "tasks": len({r.task_id for r in rows}),
        "scored": len(scored),
        "environment_unsupported": sorted({r.task_id for r in unsupported}),
        "passed": len(passed),
        "pass_rate": len(passed) / len(scored) if scored else None,
        "pass_rate_ci95": [lo, hi],
        "pass_at_k": pass_k,
        "steps": {"mean": _mean(steps), "p50": _pct(steps, 50), "max": max(steps) if steps else None},
        "commands": {"total": len(commands), "succeeded": ok_commands},
        "command_success_rate": ok_commands / len(commands) if commands else None,
        "tokens": {"total": int(sum(tokens)), "mean_per_task": _mean(tokens)},
        "cost_usd": {
            "total": float(sum(costs)),
            "per_task": _mean(costs),
            "per_solved_task": float(sum(costs)) / len(passed) if passed else None,
        },
        "latency_ms": {"p50": _pct(latency, 50), "p95": _pct(latency, 95)},
        "validation_failures": {
            "total": sum(r.validation_failures for r in scored),
            "mean_per_task": _mean([float(r.validation_failures) for r in scored]),
        },
        "routing_share": {b: n / calls for b, n in sorted(backends.items())} if calls else {},
        "by_category": categories,
        "failure_modes": dict(Counter(r.failure_mode for r in scored if r.failure_mode)),
        "held_out": sum(1 for r in rows if r.held_out),
        "expert_load": expert_load,
        "fidelity": dict(fidelity) if fidelity else None,
    }
