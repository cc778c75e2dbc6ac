"""`anthropic`: Claude through the official `anthropic` SDK's Messages API, tool use included.

Lagoon's OpenAI-shaped messages are mapped to Messages: system messages become the `system`
parameter; an assistant turn with tool calls becomes `text` + `tool_use` blocks; `tool` messages
become `tool_result` blocks in a user turn (consecutive ones merged, as the API wants). Replies map
back: `tool_use` blocks → `ToolCall`s, stop reasons `end_turn`/`tool_use`/`max_tokens` →
`stop`/`tool_calls`/`length`.

The Messages API as the anthropic SDK 2.x models it takes no sampling temperature, so the route's
`temperature` is not sent (nor recorded on the span). The client is built with `max_retries=0` and the route's timeout; the key comes from the
variable `api_key_env` names. SDK errors are translated here, once (429 → RateLimitError with
Retry-After, 529 overloaded and 5xx → BackendUnavailableError, 401/403 → AuthenticationError, a
"prompt is too long" 400 → ContextWindowExceededError). The window defaults to 200,000 tokens, what
every current Claude model accepts, unless the route sets `context_window`.

This is *not* a streaming client and does not use prompt caching or extended thinking.
"""

from __future__ import annotations

from typing import Any

import anthropic

from lagoon.errors import (
    LagoonError,
    MalformedResponseError,
)
from lagoon.protocols import ChatMessage, ChatResponse, ToolCall, ToolSpec, Usage
from lagoon.routing.backends.base import RemoteBackend, translate_sdk_error

__all__ = ["AnthropicBackend", "to_messages_api", "translate_anthropic_error"]

_NO_KEY = "no-key-needed"
_CLAUDE_WINDOW = 200_000
_STOP = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length"}


def to_messages_api(messages: list[ChatMessage]) -> tuple[str, list[dict[str, Any]]]:
    """(system prompt, Messages-API turns) for OpenAI-shaped messages."""
    system: list[str] = []
    turns: list[dict[str, Any]] = []

    def add(role: str, blocks: list[dict[str, Any]]) -> None:
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for m in messages:
        if m.role == "system":
            system.append(m.content)
        elif m.role == "tool":
            add("user", [{"type": "tool_result", "tool_use_id": m.tool_call_id or "", "content": m.content}])
        elif m.role == "assistant":
            blocks: list[dict[str, Any]] = [{"type": "text", "text": m.content}] if m.content else []
            blocks += [{"type": "tool_use", "id": c.id, "name": c.name, "input": dict(c.arguments)} for c in m.tool_calls]
            add("assistant", blocks or [{"type": "text", "text": ""}])
        else:
            add("user", [{"type": "text", "text": m.content}])
    return "\n\n".join(s for s in system if s), turns


def translate_anthropic_error(exc: Exception, backend: str, key_env: str | None) -> LagoonError:
    """One `anthropic`/`httpx` exception → the matching `lagoon.errors` class."""
    return translate_sdk_error(exc, anthropic, backend, key_env, reply="Messages response", detail=_detail,
                               base_error=anthropic.AnthropicError)


def _detail(exc: anthropic.APIStatusError) -> str:
    body = exc.body if isinstance(exc.body, dict) else {}
    err = body.get("error", {}) if isinstance(body.get("error"), dict) else {}
    return str(err.get("message", exc.message))


class AnthropicBackend(RemoteBackend):
    provider = "anthropic"
    sends_temperature = False

    def _make_client(self, api_key: str | None) -> anthropic.Anthropic:
        return anthropic.Anthropic(api_key=api_key or _NO_KEY, base_url=self.base_url, max_retries=0, timeout=self.route.timeout_s)

    def _call(
        self,
        api_key: str | None,
        messages: list[ChatMessage],
        tools: list[ToolSpec],
        max_tokens: int,
        temperature: float,
    ) -> ChatResponse:
        system, turns = to_messages_api(messages)
        kwargs: dict[str, Any] = {
            "model": self.route.model,
            "messages": turns,
            "max_tokens": max_tokens,
        }
        if system:
            kwargs["system"] = system
        if tools:
            kwargs["tools"] = [
                {"name": t.name, "description": t.description, "input_schema": dict(t.parameters)} for t in tools
            ]
        try:
            resp = self._client(api_key).messages.create(**kwargs)
            return self._parse(resp)
        except LagoonError:
            raise
        except Exception as exc:  # translated once, here
            raise translate_anthropic_error(exc, self.name, self.route.api_key_env) from None

    def _parse(self, resp: Any) -> ChatResponse:
        blocks = getattr(resp, "content", None)
        if not isinstance(blocks, list):
            raise MalformedResponseError(f"{self.name}: the reply has no content blocks", backend=self.name)
        text: list[str] = []
        calls: list[ToolCall] = []
        for b in blocks:
            kind = getattr(b, "type", None)
            if kind == "text":
                text.append(b.text)
            elif kind == "tool_use":
                if not isinstance(b.input, dict):
                    raise MalformedResponseError(f"{self.name}: tool_use {b.name!r} input is not an object", backend=self.name)
                calls.append(ToolCall(id=b.id, name=b.name, arguments=b.input))
        usage = getattr(resp, "usage", None)
        return ChatResponse(
            message=ChatMessage(role="assistant", content="".join(text), tool_calls=tuple(calls)),
            model=getattr(resp, "model", None) or self.route.model,
            usage=Usage(getattr(usage, "input_tokens", 0) or 0, getattr(usage, "output_tokens", 0) or 0),
            finish_reason=_STOP.get(getattr(resp, "stop_reason", None) or "", "stop"),
        )

    def _discover_window(self) -> int | None:
        return _CLAUDE_WINDOW
