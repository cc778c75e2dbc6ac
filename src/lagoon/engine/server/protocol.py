"""The OpenAI wire format Lagoon's server accepts and returns: request models (pydantic, so bad
fields become 400s naming the field) and builders for responses, stream chunks and error bodies.

Only what the engine can honour is accepted: `n` must be 1, and every field Lagoon does not
implement (penalties, `logit_bias`, audio, …, or a misspelt name) is refused with a 400 that names
it (`unsupported_fields`) rather than silently dropped. `logprobs` (chat: with `top_logprobs`;
completions: the number of alternatives) are returned on non-streamed replies; a stream asking for
them is refused. Structured outputs:
`response_format` (`json_object`, `json_schema`) and the Lagoon extension `structured_outputs`
(`json`, `regex`, `choice`, `grammar` — a Lark grammar — as in vLLM, which also spells them
`guided_json`, `guided_regex`, `guided_choice`, `guided_grammar`; those are accepted too).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "ChatCompletionRequest", "CompletionRequest", "StructuredOutputs", "error_body", "new_id", "chunk", "usage_dict",
]

# Fields OpenAI clients may send that change nothing here: accepted, never acted on.
_HARMLESS = {"user", "metadata", "store", "parallel_tool_calls", "service_tier"}
# Fields whose default value is what Lagoon does anyway; any other value is refused.
_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0), "logit_bias": (None, {}), "best_of": (None, 1),
}


class StructuredOutputs(BaseModel):
    """The Lagoon / vLLM extension: exactly one of these constrains the output."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | bool | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def given(self) -> list[str]:
        names = {"json_": "json"}
        return [names.get(k, k) for k in ("json_", "regex", "choice", "grammar", "json_object")
                if getattr(self, k) not in (None, False)]


class _Req(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(1, ge=1, le=1, description="only n=1 is supported")
    ignore_eos: bool = False
    response_format: dict[str, Any] | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("response_format")
    @classmethod
    def _format(cls, v: Any) -> Any:
        if v is None:
            return v
        kind = v.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise ValueError("response_format.type must be 'text', 'json_object' or 'json_schema'")
        if kind == "json_schema":
            spec = v.get("json_schema")
            if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
                raise ValueError("response_format.json_schema must be {'name': …, 'schema': {…}, 'strict': …}")
        return v

    def unsupported_fields(self) -> list[str]:
        """Request fields Lagoon would otherwise have to drop silently."""
        bad = []
        for k, v in (self.model_extra or {}).items():
            if k in _HARMLESS or (k in _DEFAULTS and v in _DEFAULTS[k]):
                continue
            bad.append(k)
        return sorted(bad)

    @property
    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(s for s in self.stop if s)

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class ChatCompletionRequest(_Req):
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    chat_template_kwargs: dict[str, Any] | None = None  # passed to the chat template (vLLM's extension)

    @property
    def logprob_count(self) -> int | None:
        """Top alternatives per token when logprobs are asked for, else None."""
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return (self.top_logprobs or 0) if self.logprobs else None

    @field_validator("messages")
    @classmethod
    def _roles(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, m in enumerate(v):
            if m.get("role") not in ("system", "developer", "user", "assistant", "tool"):
                raise ValueError(f"messages[{i}].role must be system, user, assistant or tool")
            if m["role"] == "developer":
                m["role"] = "system"
        return v

    @field_validator("tool_choice")
    @classmethod
    def _choice(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("none", "auto", "required"):
            raise ValueError("tool_choice must be 'none', 'auto', 'required' or {'type':'function','function':{'name':…}}")
        if isinstance(v, dict) and not isinstance((v.get("function") or {}).get("name"), str):
            raise ValueError("tool_choice object needs function.name")
        return v

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Req):
    prompt: str | list[str] | list[int]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    @property
    def limit(self) -> int | None:
        return self.max_tokens or 16


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_dict(prompt: int, completion: int, cached: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def chunk(rid: str, model: str, created: int, delta: dict[str, Any], finish: str | None = None,
          usage: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if delta is not None else [],
    }
    if usage is not None:
        out["usage"] = usage
    return out


ErrorType = Literal["invalid_request_error", "authentication_error", "not_found_error", "server_error", "overloaded_error"]


def error_body(message: str, type_: ErrorType = "invalid_request_error", *, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def now() -> int:
    return int(time.time())
