"""Hybrid routing: classify each coding task, send it to the cheap open-weight model or the strong
proprietary one, and survive the failures of either.

    classify.py   LexicalClassifier (seed 001's keyword rule, word-start matching), safe side, registry
    learned.py    LearnedClassifier (logistic regression, threshold calibrated to a strong-call share)
    backends/     openai_compat (openai SDK), anthropic (anthropic SDK), local (lagoon.engine, lazy)
    breaker.py    CircuitBreaker: closed → open → half-open → closed
    router.py     Router: a ChatModel over two ChatModels (retries, fallbacks, context-window check)
    metrics.py    RoutingTelemetry: classification counts, rolling-day reasoning share + alert, per-backend stats

Use:

    router = build_router(config)                 # backends from config.router, or pass `backends=`
    router.set_task(task_prompt, context_size)    # classify the agent's task once
    reply = router.chat(messages, tools=tools)    # reply.backend, reply.route say who answered and why
    router.record_validation(True); router.record_assumption_drift(0)

Nothing here imports torch; `backends.local` imports `lagoon.engine` on its first call.
"""

from __future__ import annotations

from collections.abc import Mapping

from lagoon.config import LagoonConfig
from lagoon.errors import ConfigError
from lagoon.protocols import ChatModel
from lagoon.routing.backends import build_backend, infer_provider
from lagoon.routing.breaker import BreakerState, CircuitBreaker
from lagoon.routing.classify import LexicalClassifier, apply_safe_side, build_classifier
from lagoon.routing.router import ROUTES, Router
from lagoon.stats import StatsStore
from lagoon.telemetry import Telemetry

__all__ = [
    "ROUTES",
    "Router",
    "BreakerState",
    "CircuitBreaker",
    "LexicalClassifier",
    "apply_safe_side",
    "build_backend",
    "build_classifier",
    "build_router",
    "infer_provider",
]


def build_router(
    config: LagoonConfig,
    telemetry: Telemetry | None = None,
    backends: Mapping[str, ChatModel] | None = None,
) -> Router:
    """A Router over `config.router`'s two routes; `backends` overrides either by route key
    (`retrieval_bound`, `reasoning_bound`), e.g. with `lagoon.testing.ScriptedChatModel`s. Its
    classifications, validations and drift go to the shared daily `lagoon.stats.StatsStore` unless
    `telemetry.persist_stats` is off."""
    telemetry = telemetry or Telemetry(config.telemetry)
    given = dict(backends or {})
    unknown = set(given) - set(ROUTES)
    if unknown:
        raise ConfigError(f"unknown backend key(s) {sorted(unknown)}; valid keys: {', '.join(ROUTES)}")
    built = {
        key: given[key]
        if key in given
        else build_backend(getattr(config.router, key), telemetry=telemetry, engine_config=config.engine,
                           deployment=config.model_deployment, moe=config.moe)
        for key in ROUTES
    }
    stats = StatsStore(config.telemetry.stats_path or None) if config.telemetry.persist_stats else None
    return Router(built, build_classifier(config.classification), config, telemetry, stats=stats)
