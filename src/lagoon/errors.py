"""Every error Lagoon raises on purpose, in one tree.

Retryable errors may succeed if the same call is made again later (the router retries them with
backoff, honouring `retry_after`); fatal errors will not, and need the user to change something.
Third-party exceptions (openai, anthropic, httpx, sqlite3, safetensors, gguf ...) are translated
once, at the boundary that calls the library, with ``raise Ours(...) from exc``.

    LagoonError
    ├── FatalError                     — fix the input, config or environment; retrying won't help
    │   ├── ConfigError                — bad config file, key, type or value
    │   │   └── MissingDependencyError — the config asks for an optional extra that is not installed
    │   ├── CheckpointError            — missing, truncated or mismatched model files
    │   ├── UnsupportedModelError      — a model family or feature Lagoon cannot run
    │   ├── QuantizationError          — a scheme that cannot apply to this model or device
    │   ├── IndexCorruptError          — the retrieval index cannot be read (rebuild it)
    │   ├── WorkspaceError             — a path outside the workspace, a held lock, a missing repo
    │   ├── SessionError               — an unknown, corrupt or concurrently used session
    │   ├── TaskSpecError              — an eval task whose files or fields are wrong
    │   ├── ContractError              — a coordinated agent's output breaks its typed contract
    │   ├── AuthenticationError        — missing or rejected API key
    │   ├── BadRequestError            — the backend refused the request as malformed (4xx)
    │   ├── ContextWindowExceededError — the prompt does not fit the backend's window
    │   └── NoBackendAvailableError    — every backend failed or is open
    └── RetryableError                 — transient; `retry_after` (seconds) when the peer said so
        ├── RateLimitError             — HTTP 429
        ├── BackendUnavailableError    — 5xx, refused or dropped connections
        ├── BackendTimeoutError        — no answer within the timeout
        ├── MalformedResponseError     — a reply that could not be parsed (incl. cut streams)
        └── CircuitOpenError           — the backend's breaker is open; try another or wait
"""

from __future__ import annotations

__all__ = [
    "LagoonError",
    "FatalError",
    "RetryableError",
    "ConfigError",
    "MissingDependencyError",
    "CheckpointError",
    "UnsupportedModelError",
    "QuantizationError",
    "IndexCorruptError",
    "WorkspaceError",
    "SessionError",
    "TaskSpecError",
    "ContractError",
    "AuthenticationError",
    "BadRequestError",
    "ContextWindowExceededError",
    "NoBackendAvailableError",
    "RateLimitError",
    "BackendUnavailableError",
    "BackendTimeoutError",
    "MalformedResponseError",
    "CircuitOpenError",
]


class LagoonError(Exception):
    """Base of every Lagoon error. `retryable` tells the router whether to try again."""

    retryable: bool = False

    def __init__(self, message: str, *, backend: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.backend = backend


class FatalError(LagoonError):
    """Retrying the same call will fail the same way."""


class RetryableError(LagoonError):
    """A transient failure; `retry_after` is the peer's requested delay in seconds, if any."""

    retryable = True

    def __init__(self, message: str, *, backend: str | None = None, retry_after: float | None = None) -> None:
        super().__init__(message, backend=backend)
        self.retry_after = retry_after


class ConfigError(FatalError):
    """A config file, key, type or value is wrong; the message names the key and the fix."""


class MissingDependencyError(ConfigError):
    """A feature needs a package from an optional extra; the message says `pip install 'lagoon-agent[EXTRA]'`."""

    def __init__(self, message: str, *, extra: str) -> None:
        super().__init__(message)
        self.extra = extra


class CheckpointError(FatalError):
    """Model files are missing, truncated or do not match the architecture (names the tensor)."""


class UnsupportedModelError(FatalError):
    """A model family or feature Lagoon cannot run."""


class QuantizationError(FatalError):
    """A quantization scheme cannot apply to this model, layer or device."""


class IndexCorruptError(FatalError):
    """The retrieval index on disk cannot be read; `lagoon index --rebuild` fixes it."""


class WorkspaceError(FatalError):
    """A path outside the workspace, a lock held by another session, or a missing repository."""


class SessionError(FatalError):
    """An unknown or corrupt session, or one already in use."""


class TaskSpecError(FatalError):
    """An eval task's files or fields are wrong; the message names the file and the field."""


class ContractError(FatalError):
    """A coordinated role returned something its output contract does not allow."""


class AuthenticationError(FatalError):
    """An API key is missing (name the environment variable) or was rejected."""


class BadRequestError(FatalError):
    """The backend rejected the request as malformed."""


class ContextWindowExceededError(FatalError):
    """The prompt (plus the requested completion) does not fit the backend's context window."""

    def __init__(
        self, message: str, *, backend: str | None = None, needed: int | None = None, window: int | None = None
    ) -> None:
        super().__init__(message, backend=backend)
        self.needed = needed
        self.window = window


class NoBackendAvailableError(FatalError):
    """Every backend failed, is open, or cannot fit the prompt; `attempts` says what happened."""

    def __init__(self, message: str, *, attempts: list[dict] | None = None) -> None:
        super().__init__(message)
        self.attempts = attempts or []


class RateLimitError(RetryableError):
    """HTTP 429 or a provider's rate-limit error."""


class BackendUnavailableError(RetryableError):
    """5xx, a refused connection, or a dropped one."""


class BackendTimeoutError(RetryableError):
    """The backend did not answer within the timeout."""


class MalformedResponseError(RetryableError):
    """A reply that could not be parsed, including a stream cut midway."""


class CircuitOpenError(RetryableError):
    """The backend's circuit breaker is open; `retry_after` is when it will let a trial call through."""
