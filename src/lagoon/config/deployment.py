"""Seed 000's `model_deployment` block: architecture, quantization, MoE expert routing, agent memory,
evaluation leakage controls, inference options."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from lagoon.config.section import Section


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
    """Seed 000's `inference.tool_state_persistence` moved to `agent.persist_tool_state` (it is the
    agent's, not the engine's); the seed key still loads (`lagoon.config.loader.MOVED`)."""

    async_expert_prefetch: bool = True
    """Prefetch offloaded experts for the next layer on a background thread."""

    speculative_routing: bool = True
    """Guess the next layer's experts from the current hidden state to start prefetch early."""



class ModelDeploymentSection(Section):
    renamed: ClassVar[dict[str, str]] = {"routing": "expert_routing"}
    architecture: Literal["moe_sparse", "dense"] = "moe_sparse"
    """Model family shape: sparse mixture-of-experts or dense."""

    variant: str = "embedded"
    """The model this deployment runs, recorded in telemetry and reports. A known name
    (`lagoon.model.variants.VARIANTS`: laguna_xs2, qwen3_coder_30b_a3b, gpt_oss_20b, glm45_air, ...) is
    checked against the loaded checkpoint (family, experts, k, layers, parameter counts); any other
    name is a free-form label."""

    total_parameters: str | float | None = None
    """Declared total parameter count (e.g. '33.4B'); informational, checked against the loaded model
    in reports."""

    active_parameters: str | float | None = None
    """Declared active parameters per token (e.g. '3B'); informational."""

    quantization: QuantizationSection = Field(default_factory=QuantizationSection)
    """Weight and activation quantization."""

    expert_routing: MoeRoutingSection = Field(default_factory=MoeRoutingSection)
    """Expert routing inside MoE layers (seed spelling: `routing`; not the task router, which is the
    top-level `router` section)."""

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
