"""`openai_compat`: any server that speaks OpenAI chat completions (vLLM, SGLang, llama.cpp server,
Ollama, `lagoon serve`, OpenAI itself) through the official `openai` SDK.

The SDK client is built with `max_retries=0` (the router retries) and the route's `timeout_s`; the key comes from the route's `api_key_env` variable, or a placeholder for servers
that need none. Every SDK/httpx error is translated here, once, into `lagoon.errors`:

    401/403 → AuthenticationError        429 → RateLimitError (Retry-After honoured)
    400 "context length…" → ContextWindowExceededError      other 4xx → BadRequestError
    408 / timeout → BackendTimeoutError  5xx, 409, refused/dropped connection → BackendUnavailableError
    unparsable body, a body cut midway, a reply without choices → MalformedResponseError

The context window is the route's `context_window`, else what `GET /models` reports
(`max_model_len` from vLLM/`lagoon serve`, `context_length`, llama.cpp's `meta.n_ctx_train`), else
8192 — logged, and said in the route report (`notes`); the lookup is made once and its result (or
its failure) cached.

This is *not* a streaming client: replies are read whole.
"""

from __future__ import annotations

import json
from typing import Any

import openai

from lagoon.errors import (
    LagoonError,
    MalformedResponseError,
)
from lagoon.protocols import ChatMessage, ChatResponse, ToolCall, ToolSpec, Usage
from lagoon.routing.backends.base import (
    RemoteBackend,
    api_key_from_env,
    estimate_tokens,
    translate_sdk_error,
)

__all__ = ["OpenAICompatBackend", "translate_openai_error"]

_NO_KEY = "no-key-needed"


def translate_openai_error(exc: Exception, backend: str, key_env: str | None) -> LagoonError:
    """One `openai`/`httpx` exception → the matching `lagoon.errors` class (message names the backend)."""
    return translate_sdk_error(exc, openai, backend, key_env, reply="chat completion", detail=_detail,
                               base_error=openai.OpenAIError)


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    return str(body or exc.message)


class OpenAICompatBackend(RemoteBackend):
    provider = "openai_compat"

    def _make_client(self, api_key: str | None) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key or _NO_KEY, max_retries=0, timeout=self.route.timeout_s)

    def _call(
        self,
        api_key: str | None,
        messages: list[ChatMessage],
        tools: list[ToolSpec],
        max_tokens: int,
        temperature: float,
    ) -> ChatResponse:
        kwargs: dict[str, Any] = {
            "model": self.route.model,
            "messages": [m.to_openai() for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
        }
        if tools:
            kwargs["tools"] = [t.to_openai() for t in tools]
        try:
            resp = self._client(api_key).chat.completions.create(**kwargs)
            return self._parse(resp, messages, tools)
        except LagoonError:
            raise
        except Exception as exc:  # translated once, here
            raise translate_openai_error(exc, self.name, self.route.api_key_env) from None

    def _parse(self, resp: Any, messages: list[ChatMessage], tools: list[ToolSpec]) -> ChatResponse:
        choices = getattr(resp, "choices", None)
        if not choices or getattr(choices[0], "message", None) is None:
            raise MalformedResponseError(f"{self.name}: the reply has no choices", backend=self.name)
        choice = choices[0]
        msg = choice.message
        calls = []
        for i, tc in enumerate(msg.tool_calls or ()):
            fn = getattr(tc, "function", None)
            if fn is None:
                continue
            try:
                args = json.loads(fn.arguments or "{}")
            except json.JSONDecodeError:
                raise MalformedResponseError(
                    f"{self.name}: tool call {fn.name!r} has arguments that are not JSON", backend=self.name
                ) from None
            if not isinstance(args, dict):
                raise MalformedResponseError(f"{self.name}: tool call {fn.name!r} arguments are not an object", backend=self.name)
            calls.append(ToolCall(id=tc.id or f"call_{i}", name=fn.name, arguments=args))
        content = msg.content or ""
        if resp.usage is not None:
            usage = Usage(resp.usage.prompt_tokens or 0, resp.usage.completion_tokens or 0)
        else:
            usage = Usage(estimate_tokens(messages, tools), estimate_tokens([ChatMessage("assistant", content)]))
        finish = choice.finish_reason or ("tool_calls" if calls else "stop")
        return ChatResponse(
            message=ChatMessage(role="assistant", content=content, tool_calls=tuple(calls)),
            model=resp.model or self.route.model,
            usage=usage,
            finish_reason=finish,
        )

    def _discover_window(self) -> int | None:
        try:
            key = api_key_from_env(self.route, self.name)
            client = self._client(key).with_options(timeout=min(5.0, self.route.timeout_s))
            models = client.models.list().data
        except openai.OpenAIError as exc:  # the caller logs it and puts it in the route report
            raise translate_openai_error(exc, self.name, self.route.api_key_env) from exc
        for m in models:
            if m.id != self.route.model and len(models) > 1:
                continue
            extra = m.model_extra or {}
            for key_name in ("max_model_len", "context_length", "context_window"):
                if isinstance(extra.get(key_name), int):
                    return extra[key_name]
            meta = extra.get("meta")
            if isinstance(meta, dict) and isinstance(meta.get("n_ctx_train"), int):
                return meta["n_ctx_train"]
        return None
