"""Model backends the router can call, picked by provider name from a registry.

    openai_compat  → lagoon.routing.backends.openai_compat.OpenAICompatBackend  (official `openai` SDK)
    anthropic      → lagoon.routing.backends.anthropic.AnthropicBackend         (official `anthropic` SDK)
    local          → lagoon.routing.backends.local.LocalBackend                 (in-process `lagoon.engine`)

`build_backend(route, name, telemetry)` reads the route's `provider`, or infers it from the endpoint
(`infer_provider`), imports the implementation lazily and builds it. Every backend is a
`protocols.ChatModel`; none retries on its own.
"""

from __future__ import annotations

from typing import Any

from lagoon.config import EngineSection, ModelDeploymentSection, MoeSection, RouteSection
from lagoon.protocols import ChatModel
from lagoon.registry import Registry
from lagoon.routing.backends.base import infer_provider, split_endpoint
from lagoon.telemetry import Telemetry

__all__ = ["BACKENDS", "build_backend", "infer_provider", "split_endpoint"]

BACKENDS: Registry[Any] = Registry("backend provider", {
    "openai_compat": "lagoon.routing.backends.openai_compat:OpenAICompatBackend",
    "anthropic": "lagoon.routing.backends.anthropic:AnthropicBackend",
    "local": "lagoon.routing.backends.local:LocalBackend",
}, where="router.*.provider")


def build_backend(
    route: RouteSection,
    name: str | None = None,
    telemetry: Telemetry | None = None,
    *,
    engine_config: EngineSection | None = None,
    deployment: ModelDeploymentSection | None = None,
    moe: MoeSection | None = None,
) -> ChatModel:
    """The backend a route describes (provider given or inferred from the endpoint); `engine_config`,
    `deployment` and `moe` are how the `local` backend loads the in-process engine."""
    provider = infer_provider(route)
    cls = BACKENDS.load(provider)
    kwargs = {"engine_config": engine_config, "deployment": deployment, "moe": moe} if provider == "local" else {}
    return cls(route, name=name, telemetry=telemetry, **kwargs)
