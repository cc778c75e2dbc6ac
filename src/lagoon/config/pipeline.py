"""Seed 001's `PipelineConfig` sections: context, classification, the router's routes and
resilience, validation gates, telemetry."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, model_validator

from lagoon.config.section import Section, _to_snake


class ContextSection(Section):
    max_chunk_size: int = Field(4096, ge=64)
    """Largest chunk, in characters; longer definitions split at statement boundaries."""

    staleness_threshold_ms: int = Field(300000, ge=0)
    """A snapshot older than this fails validation."""

    max_assumptions_per_snapshot: int = Field(5, ge=0)
    """A snapshot declaring more assumptions than this fails validation."""

    version_increment_on_validation: bool = True
    """Bump the snapshot version each time it is re-verified."""

    top_k: int = Field(5, ge=1, le=50)
    """Chunks handed to the model per retrieval (the seed says 3-5)."""

    token_budget: int = Field(4000, ge=64)
    """Hard cap, in tokens, on the rendered retrieved context."""

    lexical_candidates: int = Field(20, ge=1)
    """BM25 hits passed to the reranker."""

    rerank: bool = True
    """Rescore BM25 candidates with the MiniLM model (needs the `rerank` extra)."""

    rerank_weight: float = Field(0.5, ge=0.0, le=1.0)
    """Weight of the neural score when fused with the lexical one."""

    chunk_ttl_s: float = Field(600.0, ge=0.0)
    """Consumed chunks expire this long after they were handed to a model."""

    max_file_bytes: int = Field(1_000_000, ge=1)
    """Files larger than this are not indexed."""

    exclude: list[str] = Field(default_factory=lambda: ["node_modules/", "vendor/", "third_party/", ".git/"])
    """Gitignore-style patterns never indexed, on top of the repo's .gitignore."""


class ClassificationSection(Section):
    reasoning_keywords: list[str] = Field(
        default_factory=lambda: ["architect", "design", "refactor", "optimize", "synthesize"]
    )
    """Words that vote for REASONING_BOUND (matched at the start of a word)."""

    retrieval_keywords: list[str] = Field(default_factory=lambda: ["fix", "test", "lint", "format", "extract"])
    """Words that vote for RETRIEVAL_BOUND (matched at the start of a word)."""

    context_size_threshold: int = Field(15000, ge=0)
    """Context larger than this (characters) makes a task reasoning-bound."""

    confidence_threshold: float = Field(0.65, ge=0.0, le=1.0)
    """Below this confidence the router takes `safe_side`."""

    classifier: Literal["lexical", "learned"] = "lexical"
    """`lexical` (the seed's keyword rule) or `learned` (a fitted logistic regression)."""

    model_path: str | None = None
    """Path of a classifier saved by `lagoon router fit` (used when classifier = learned)."""

    safe_side: Literal["REASONING_BOUND", "RETRIEVAL_BOUND"] = "REASONING_BOUND"
    """Where low-confidence tasks go."""


class RouteSection(Section):
    model: str = "embedded"
    """Model name sent to the backend."""

    endpoint: str = "local"
    """Base URL (`http://host:port/v1`), a full chat URL (`.../v1/chat/completions`, `.../v1/messages`),
    or `local` / `embedded` for the in-process engine."""

    max_tokens: int = Field(1024, ge=1)
    """Largest completion requested."""

    temperature: float = Field(0.2, ge=0.0, le=2.0)
    """Sampling temperature."""

    provider: Literal["openai_compat", "anthropic", "local"] | None = None
    """Backend protocol; inferred from the endpoint when unset."""

    api_key_env: str | None = None
    """Name of the environment variable holding the API key (never the key itself)."""

    context_window: int | None = Field(None, ge=256)
    """Prompt + completion tokens the backend accepts; None asks the backend or assumes 8192."""

    timeout_s: float = Field(120.0, gt=0.0)
    """Per-request timeout."""

    price_input_per_mtok: float = Field(0.0, ge=0.0)
    """USD per million prompt tokens (cost accounting)."""

    price_output_per_mtok: float = Field(0.0, ge=0.0)
    """USD per million completion tokens (cost accounting)."""

    @model_validator(mode="before")
    @classmethod
    def _no_literal_secrets(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            for k in data:
                if _to_snake(str(k)) in {"api_key", "apikey", "key", "token", "secret"}:
                    raise ValueError(
                        f"'{k}' looks like a secret; secrets are never stored in config. "
                        "Put the key in an environment variable and set api_key_env to its name"
                    )
        return data


class RoutingSection(Section):
    retrieval_bound: RouteSection = Field(default_factory=RouteSection)
    """Backend for retrieval-bound tasks (the cheap open-weight model)."""

    reasoning_bound: RouteSection = Field(
        default_factory=lambda: RouteSection(
            model="claude-sonnet-4",
            endpoint="https://api.anthropic.com/v1/messages",
            max_tokens=4096,
            temperature=0.3,
            api_key_env="ANTHROPIC_API_KEY",
        )
    )
    """Backend for reasoning-bound tasks (the strong proprietary model)."""

    max_retries: int = Field(2, ge=0)
    """Retries of a retryable error on one backend before falling back."""

    backoff_base_s: float = Field(0.5, ge=0.0)
    """First retry delay; doubles each retry, with jitter; Retry-After wins when given."""

    breaker_fail_max: int = Field(3, ge=1)
    """Consecutive failures that open a backend's circuit breaker."""

    max_retry_after_s: float = Field(30.0, ge=0.0)
    """A Retry-After longer than this is not waited for: the router falls back to the other backend."""

    fallback: bool = True
    """Try the other backend when the chosen one is open, fails, or cannot fit the prompt."""


class ValidationSection(Section):
    require_fresh_context: bool = True
    """Refuse to call a model on a snapshot older than context.stalenessThresholdMs."""

    reject_unverified_assumptions: bool = True
    """Refuse snapshots whose declared assumptions are not all verified."""

    max_consecutive_validation_failures: int = Field(3, ge=1)
    """The agent halts after this many failed validations in a row."""

    circuit_breaker_timeout_ms: int = Field(60000, ge=0)
    """How long an open circuit breaker waits before letting one trial call through."""


class TelemetrySection(Section):
    enable_task_classification_logging: bool = True
    """Log and count each classification."""

    enable_assumption_drift_tracking: bool = True
    """Record assumption drift and validation pass rate reported by the agent."""

    metrics_endpoint: str | None = None
    """OTLP/HTTP metrics URL; metrics are exported there when set (Prometheus text is always served
    by `lagoon serve` at /metrics)."""

    export_interval_s: float = Field(10.0, gt=0.0)
    """How often metrics are pushed to metrics_endpoint."""

    reasoning_share_alert: float = Field(0.40, ge=0.0, le=1.0)
    """Alert when reasoning-bound tasks exceed this share of the rolling day."""

    persist_stats: bool = True
    """Keep classifications, validation results and assumption drift per day in stats_path, shared by
    every run and route, so the reasoning-share alert sees them all (`lagoon stats`)."""

    stats_path: str = ""
    """The daily stats database (SQLite); empty: $XDG_STATE_HOME/lagoon/stats.sqlite
    (~/.local/state/lagoon/stats.sqlite)."""

    service_name: str = "lagoon"
    """OpenTelemetry service.name resource attribute."""
