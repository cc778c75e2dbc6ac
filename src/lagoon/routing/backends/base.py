"""What every remote backend shares: endpoint parsing, provider inference, API keys from the
environment, token estimates, cost from the route's prices, and the telemetry span around a call.

`RemoteBackend.chat` is the template: check the key, open a GenAI span, call `_call` (the
provider-specific request, which translates its SDK's errors into `lagoon.errors` exactly once),
fill usage and cost. Subclasses implement `_call` only.

Keys are read from the environment variable the route names (`api_key_env`) at every call and are
never logged, put in a `repr` or in a response. The SDK client (which holds the key, as every SDK
client does) is kept and reused while the key stays the same — building one costs 100–150 ms — and
rebuilt when the variable changes. This module is *not* a retry policy:
the SDKs are built with `max_retries=0` and the router retries.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from lagoon.config import RouteSection
from lagoon.errors import (
    AuthenticationError,
    BackendTimeoutError,
    BackendUnavailableError,
    BadRequestError,
    ConfigError,
    ContextWindowExceededError,
    LagoonError,
    MalformedResponseError,
    RateLimitError,
)
from lagoon.protocols import ChatMessage, ChatResponse, ToolSpec
from lagoon.telemetry import Telemetry
from lagoon.token_estimate import approx_token_count

__all__ = [
    "PROVIDERS",
    "CONTEXT_ERROR_RE",
    "error_for_status",
    "infer_provider",
    "split_endpoint",
    "api_key_from_env",
    "estimate_tokens",
    "cost_usd",
    "RemoteBackend",
    "traced_chat",
    "translate_sdk_error",
    "cut_midway",
]

log = logging.getLogger("lagoon.routing")

PROVIDERS = ("openai_compat", "anthropic", "local")

# Suffixes the seed writes as "the endpoint"; the SDKs want the base URL in front of them.
_CHAT_SUFFIXES = ("/chat/completions", "/chat", "/messages")
_DEFAULT_WINDOW = 8192
_PER_MESSAGE_TOKENS = 4
#: Error texts servers use for an over-long prompt (OpenAI, Anthropic, vLLM, SGLang, llama.cpp, Ollama).
CONTEXT_ERROR_RE = re.compile(
    r"context[ _]length|maximum context|context window|too many tokens|prompt is too long|exceeds the (?:max|limit)",
    re.I,
)


def infer_provider(route: RouteSection) -> str:
    """`route.provider` when set; else anthropic for an anthropic.com host or a `/messages` path,
    local for `local`/`embedded`, openai_compat for anything else."""
    if route.provider:
        return route.provider
    endpoint = route.endpoint.strip()
    if endpoint.lower() in {"local", "embedded"}:
        return "local"
    parts = urlsplit(endpoint)
    host = (parts.hostname or "").lower()
    if host == "anthropic.com" or host.endswith(".anthropic.com") or parts.path.rstrip("/").endswith("/messages"):
        return "anthropic"
    return "openai_compat"


def split_endpoint(endpoint: str, provider: str) -> str:
    """The SDK base URL for an endpoint given as a base URL or a full chat URL.

    openai_compat: `http://h:p/v1/chat/completions`, `http://h:p/v1/chat` and `http://h:p/v1` all
    give `http://h:p/v1`. anthropic: the SDK appends `/v1/messages` itself, so
    `https://api.anthropic.com/v1/messages` and `https://api.anthropic.com/v1` give
    `https://api.anthropic.com`.
    """
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in {"http", "https"} or not parts.netloc:
        raise ConfigError(
            f"endpoint {endpoint!r} is not an http(s) URL; write a base URL such as "
            "http://127.0.0.1:8000/v1, a full chat URL (.../v1/chat/completions, .../v1/messages), "
            "or 'local' for the in-process engine"
        )
    path = parts.path.rstrip("/")
    for suffix in _CHAT_SUFFIXES:
        if path.endswith(suffix):
            path = path[: -len(suffix)]
            break
    if provider == "anthropic" and path.endswith("/v1"):
        path = path[: -len("/v1")]
    return urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def api_key_from_env(route: RouteSection, backend: str) -> str | None:
    """The key from the variable `route.api_key_env` names; None when the route names none.

    Raises AuthenticationError naming the variable (never a value) when it is named but unset."""
    if not route.api_key_env:
        return None
    value = os.environ.get(route.api_key_env, "").strip()
    if not value:
        raise AuthenticationError(
            f"{backend}: environment variable {route.api_key_env} is not set; export it with the API key "
            f"(router.*.api_key_env names it)",
            backend=backend,
        )
    return value


def estimate_tokens(messages: Sequence[ChatMessage], tools: Sequence[ToolSpec] = ()) -> int:
    """Prompt-size estimate for backends without a local tokenizer (words + punctuation, per-message
    overhead, tool schemas as JSON)."""
    n = 0
    for m in messages:
        n += approx_token_count(m.content) + _PER_MESSAGE_TOKENS
        for c in m.tool_calls:
            n += approx_token_count(c.name + json.dumps(dict(c.arguments)))
    for t in tools:
        n += approx_token_count(json.dumps(t.to_openai()))
    return n


def cost_usd(route: RouteSection, input_tokens: int, output_tokens: int) -> float:
    """USD for one call from the route's per-million-token prices."""
    return (input_tokens * route.price_input_per_mtok + output_tokens * route.price_output_per_mtok) / 1e6


def traced_chat(
    call: Callable[[], ChatResponse],
    *,
    name: str,
    route: RouteSection,
    provider: str,
    telemetry: Telemetry,
    max_tokens: int,
    temperature: float | None,
) -> ChatResponse:
    """The call path every backend shares (remote SDKs and the in-process engine): a GenAI span
    around `call()`, the route's cost on the usage, who answered and how long it took.
    `temperature` is None when the protocol does not take one (it is then not on the span)."""
    start = time.perf_counter()
    with telemetry.model_call_span(
        operation="chat", model=route.model, provider=provider, max_tokens=max_tokens, temperature=temperature
    ) as record:
        response = call()
        record.input_tokens = response.usage.input_tokens
        record.output_tokens = response.usage.output_tokens
        record.response_model = response.model
        record.finish_reason = response.finish_reason
    usage = replace(response.usage, cost_usd=cost_usd(route, response.usage.input_tokens, response.usage.output_tokens))
    return replace(response, usage=usage, backend=name, latency_s=time.perf_counter() - start)


class RemoteBackend:
    """Shared call path of the SDK-backed backends; subclasses define `provider` and `_call`."""

    provider = "remote"
    #: Whether the protocol takes a sampling temperature (recorded on the span only when sent).
    sends_temperature = True

    def __init__(self, route: RouteSection, name: str | None = None, telemetry: Telemetry | None = None) -> None:
        self.route = route
        self.name = name or f"{self.provider}:{route.model}"
        self.telemetry = telemetry or Telemetry()
        self.base_url = split_endpoint(route.endpoint, self.provider)
        self._window = route.context_window
        self.window_note: str | None = None
        """Set when the context window is a fallback guess, saying why (the route report carries it)."""
        self._lock = threading.Lock()
        self._cached: tuple[str, Any] | None = None

    def _client(self, api_key: str | None) -> Any:
        """The SDK client for this key (reused; rebuilt when the key changes)."""
        fingerprint = hashlib.sha256((api_key or "").encode()).hexdigest()
        with self._lock:
            if self._cached is None or self._cached[0] != fingerprint:
                if self._cached is not None:
                    self._cached[1].close()
                self._cached = (fingerprint, self._make_client(api_key))
            return self._cached[1]

    def _make_client(self, api_key: str | None) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        with self._lock:
            if self._cached is not None:
                self._cached[1].close()
                self._cached = None

    # ------------------------------------------------------------------ ChatModel
    @property
    def context_window(self) -> int:
        if self._window is None:
            try:
                found = self._discover_window()
                why = "the server reported none"
            except LagoonError as exc:
                found, why = None, f"discovery failed: {exc}"
            if found is None:
                self.window_note = (f"context window assumed {_DEFAULT_WINDOW} ({why}); "
                                    "set the route's context_window")
                log.warning("%s: %s", self.name, self.window_note)
            self._window = found or _DEFAULT_WINDOW
        return self._window

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return estimate_tokens(messages)

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatResponse:
        if not messages:
            raise ValueError("chat() needs at least one message")
        key = api_key_from_env(self.route, self.name)
        max_tokens = self.route.max_tokens if max_tokens is None else max_tokens
        temperature = self.route.temperature if temperature is None else temperature
        return traced_chat(
            lambda: self._call(key, list(messages), list(tools), max_tokens, temperature),
            name=self.name, route=self.route, provider=self.provider, telemetry=self.telemetry,
            max_tokens=max_tokens, temperature=temperature if self.sends_temperature else None,
        )

    # ------------------------------------------------------------------ subclass hooks
    def _call(
        self,
        api_key: str | None,
        messages: list[ChatMessage],
        tools: list[ToolSpec],
        max_tokens: int,
        temperature: float,
    ) -> ChatResponse:
        raise NotImplementedError

    def _discover_window(self) -> int | None:
        """The server's context window; None when it reports none (a LagoonError when asking failed)."""
        return None

    def __repr__(self) -> str:
        # Never include a key: only the route's public fields.
        return f"{type(self).__name__}(name={self.name!r}, base_url={self.base_url!r})"


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from a `Retry-After` (or `retry-after-ms`) header; None when absent or unparsable."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            when = parsedate_to_datetime(raw)
        except (TypeError, ValueError):
            return None
        return max(0.0, when.timestamp() - time.time())


def translate_sdk_error(
    exc: Exception, sdk: Any, backend: str, key_env: str | None, *, reply: str, detail: Callable[[Any], str],
    base_error: type[Exception],
) -> LagoonError:
    """One exception of an official SDK (`openai` or `anthropic`: both name their errors alike) or
    of httpx → the matching `lagoon.errors` class. `reply` names what a valid answer is (for the
    message); `detail` reads the provider's error text out of an `APIStatusError`."""
    if isinstance(exc, sdk.APITimeoutError):
        return BackendTimeoutError(f"{backend}: no answer within the timeout", backend=backend)
    if isinstance(exc, sdk.APIConnectionError):
        if cut_midway(exc):
            return MalformedResponseError(f"{backend}: the reply was cut off midway", backend=backend)
        return BackendUnavailableError(f"{backend}: cannot connect ({type(exc.__cause__).__name__})", backend=backend)
    if isinstance(exc, sdk.APIResponseValidationError | json.JSONDecodeError | ValueError):
        return MalformedResponseError(f"{backend}: the reply is not a valid {reply}", backend=backend)
    if isinstance(exc, sdk.APIStatusError):
        return error_for_status(backend, exc.status_code, exc.response.headers, detail(exc), key_env)
    if isinstance(exc, base_error):
        return BackendUnavailableError(f"{backend}: {type(exc).__name__}", backend=backend)
    return MalformedResponseError(f"{backend}: unexpected reply ({type(exc).__name__})", backend=backend)


def cut_midway(exc: BaseException) -> bool:
    """Did the connection drop after the reply had started (an httpx RemoteProtocolError)?

    Matched by class name: openai 3.x ships its own fork of httpx (`httpx2`), anthropic uses httpx."""
    seen: BaseException | None = exc
    while seen is not None:
        if any(c.__name__ == "RemoteProtocolError" for c in type(seen).__mro__):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def error_for_status(backend: str, status: int, headers: Any, detail: str, key_env: str | None) -> LagoonError:
    """One HTTP error status from any provider's SDK → the Lagoon error the router acts on."""
    after = retry_after_seconds(headers)
    if status in (401, 403):
        hint = f"check the key in {key_env}" if key_env else "set router.*.api_key_env to the variable holding a key"
        return AuthenticationError(f"{backend}: the server rejected the credentials (HTTP {status}); {hint}", backend=backend)
    if status == 429:
        return RateLimitError(f"{backend}: rate limited (HTTP 429)", backend=backend, retry_after=after)
    if status == 408:
        return BackendTimeoutError(f"{backend}: request timed out at the server (HTTP 408)", backend=backend, retry_after=after)
    if status == 409 or status >= 500:
        return BackendUnavailableError(f"{backend}: server error (HTTP {status})", backend=backend, retry_after=after)
    if CONTEXT_ERROR_RE.search(detail):
        return ContextWindowExceededError(f"{backend}: the prompt does not fit ({detail[:200]})", backend=backend)
    return BadRequestError(f"{backend}: request refused (HTTP {status}): {detail[:300]}", backend=backend)
