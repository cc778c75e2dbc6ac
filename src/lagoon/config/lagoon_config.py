"""`LagoonConfig`: the whole configuration, one field per section."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import Field

from lagoon.config.deployment import ModelDeploymentSection
from lagoon.config.pipeline import (
    ClassificationSection,
    ContextSection,
    RoutingSection,
    TelemetrySection,
    ValidationSection,
)
from lagoon.config.runtime import AgentSection, EngineSection, EvalSection, MoeSection, ServerSection
from lagoon.config.section import Section


class LagoonConfig(Section):
    renamed: ClassVar[dict[str, str]] = {"routing": "router"}
    """The whole configuration. Seed 000's block lives under `model_deployment`; seed 001's
    PipelineConfig keys are top-level sections."""

    model_deployment: ModelDeploymentSection = Field(default_factory=ModelDeploymentSection)
    """Seed 000: model architecture, quantization, MoE routing, memory, evaluation, inference."""

    context: ContextSection = Field(default_factory=ContextSection)
    """Seed 001: retrieval, chunking and snapshot validity."""

    classification: ClassificationSection = Field(default_factory=ClassificationSection)
    """Seed 001: the task classifier."""

    router: RoutingSection = Field(default_factory=RoutingSection)
    """Seed 001: the task router's two backends and its resilience (seed spelling: `routing`; not
    MoE expert routing, which is `model_deployment.expert_routing`)."""

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
