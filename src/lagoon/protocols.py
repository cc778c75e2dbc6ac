"""The seams between Lagoon's parts, as `typing.Protocol`s, and the small value types they exchange.

Implementations live in their packages (`routing.backends`, `agent.environment`, `context.retriever`,
`agent.session`, `routing.classify`, `context.snapshot`, `agent.tools`, `engine.kv_cache`,
`moe.expert_store`) and in `lagoon.testing` (deterministic doubles). Nothing here imports torch, the
agent or any backend SDK at run time (annotations only).

    ChatModel ─ RoutedModel, WindowReporting   what the agent calls, and what it tells a router
    Environment, Tool, LockKeeper              where commands run; what the model may call
    Retriever, SnapshotManager                 the code context and its validation
    ValidationVerdict, Summarizer, SessionLog  a validation's answer; memory summaries; the event log
    Classifier                                 the router's task classifier
    CacheLike, ExpertStore                     the engine's KV cache and the MoE offload tiers

Messages follow the OpenAI chat shape (role, content, tool_calls, tool_call_id) because every
backend Lagoon speaks can be mapped to and from it.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

if TYPE_CHECKING:  # annotations only: this module imports neither torch nor the agent
    import torch

    from lagoon.agent.memory import Turn
    from lagoon.agent.summarizer import Summary
    from lagoon.agent.tools import ToolOutput

__all__ = [
    "ChatMessage",
    "ToolCall",
    "ToolSpec",
    "Usage",
    "ChatResponse",
    "RouteReport",
    "RouteAttempt",
    "RouteFallback",
    "ChatModel",
    "RoutedModel",
    "WindowReporting",
    "CommandResult",
    "Environment",
    "ChunkLike",
    "Retriever",
    "SessionLog",
    "ValidationVerdict",
    "SnapshotManager",
    "Summarizer",
    "Tool",
    "LockKeeper",
    "CacheLike",
    "ExpertStore",
    "TaskType",
    "Classification",
    "Classifier",
]

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class ToolCall:
    """One function call the model asked for; `arguments` is the parsed JSON object."""

    id: str
    name: str
    arguments: Mapping[str, Any]


@dataclass(frozen=True)
class ChatMessage:
    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None

    def to_openai(self) -> dict[str, Any]:
        """The message as an OpenAI chat-completions dict."""
        import json

        msg: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            msg["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": json.dumps(dict(c.arguments))},
                }
                for c in self.tool_calls
            ]
        if self.tool_call_id is not None:
            msg["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            msg["name"] = self.name
        return msg


@dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model: name, description and a JSON-schema of its parameters."""

    name: str
    description: str
    parameters: Mapping[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": dict(self.parameters)},
        }


@dataclass(frozen=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cost_usd + other.cost_usd,
        )


@dataclass
class RouteAttempt:
    """One try of one backend: `outcome` is ``ok``, ``skipped`` or the error class name."""

    backend: str
    outcome: str
    reason: str | None = None
    latency_s: float | None = None
    needed: int | None = None
    """Prompt + completion tokens, when skipped for the context window."""
    window: int | None = None
    retry_after_s: float | None = None
    waited_s: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass(frozen=True)
class RouteFallback:
    source: str
    """The route key given up on."""
    target: str
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "reason": self.reason}


@dataclass
class RouteReport:
    """The router's account of one call: how the task was classified, which route it chose, every
    attempt, retry and fallback, who answered, and notes (e.g. an assumed context window)."""

    classification: Classification
    source: str
    """What was classified: the agent's ``task`` (`set_task`) or this call's last ``message``."""
    chosen: str
    attempts: list[RouteAttempt] = field(default_factory=list)
    retries: int = 0
    fallbacks: list[RouteFallback] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    backend: str = ""
    """The route key that answered ("" while none has)."""
    backend_name: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON shape recorded in trajectories and printed by `lagoon route --json`."""
        c = self.classification
        return {
            "classification": {"type": c.type.value, "confidence": round(c.confidence, 4), "decided_by": c.decided_by,
                               "required_capabilities": list(c.required_capabilities), "source": self.source},
            "chosen": self.chosen, "attempts": [a.to_dict() for a in self.attempts], "retries": self.retries,
            "fallbacks": [f.to_dict() for f in self.fallbacks], "notes": list(self.notes),
            "backend": self.backend, "backend_name": self.backend_name,
        }


@dataclass(frozen=True)
class ChatResponse:
    """A model's reply. `backend` names who answered; `route` carries the router's account of why
    (classification, retries, fallbacks) when a router produced it."""

    message: ChatMessage
    model: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: str = "stop"
    backend: str = ""
    latency_s: float = 0.0
    route: RouteReport | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, route=None))
        out["route"] = self.route.to_dict() if self.route is not None else None
        return out


@runtime_checkable
class ChatModel(Protocol):
    """Anything that answers a chat: one backend, the in-process engine, or a router over several."""

    name: str

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatResponse: ...

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        """Prompt tokens these messages take in this model's tokenizer (an estimate if it has none)."""
        ...

    @property
    def context_window(self) -> int: ...


@runtime_checkable
class RoutedModel(ChatModel, Protocol):
    """A chat model that routes between others (`lagoon.routing.Router`). The agent tells it the
    task once, so every call of the task goes the same way, and reports each context validation."""

    def set_task(self, prompt: str, context_size: int = 0) -> Classification:
        """Classify the task once; `context_size` is the retrieved context's length in characters."""
        ...

    def record_validation(self, passed: bool) -> None: ...

    def record_assumption_drift(self, n: int) -> None: ...


@runtime_checkable
class WindowReporting(Protocol):
    """A backend that can say its context window is a guess (the route report carries the note)."""

    window_note: str | None
    """None when the window was configured or reported by the server; else why it was assumed."""


@dataclass(frozen=True)
class CommandResult:
    command: str
    exit_code: int
    output: str
    duration_s: float = 0.0
    timed_out: bool = False
    truncated: bool = False


@runtime_checkable
class Environment(Protocol):
    """Where the agent's commands run (a workspace directory, optionally inside a sandbox)."""

    root: Any

    def execute(self, command: str, *, timeout_s: float | None = None) -> CommandResult: ...


@runtime_checkable
class ChunkLike(Protocol):
    path: str
    start_line: int
    end_line: int
    symbol: str | None
    text: str


@runtime_checkable
class Retriever(Protocol):
    """Answers "what code matters for this query?" within a token budget."""

    def retrieve(self, query: str, *, k: int | None = None, budget_tokens: int | None = None) -> Sequence[ChunkLike]: ...


@runtime_checkable
class SessionLog(Protocol):
    """Durable, append-only record of an agent session (`lagoon.agent.session.SessionStore`)."""

    def append(self, session_id: str, kind: str, payload: Mapping[str, Any]) -> int:
        """Commit one event; returns its sequence number."""
        ...

    def events(self, session_id: str) -> Iterator[Mapping[str, Any]]: ...


class TaskType(StrEnum):
    RETRIEVAL_BOUND = "RETRIEVAL_BOUND"
    REASONING_BOUND = "REASONING_BOUND"


@dataclass(frozen=True)
class Classification:
    type: TaskType
    confidence: float
    required_capabilities: tuple[str, ...] = ()
    decided_by: str = ""
    """Which rule or model decided (e.g. 'lexical:keywords', 'lexical:context_size', 'learned:v1',
    'safe_side')."""


@runtime_checkable
class Classifier(Protocol):
    def classify(self, prompt: str, context_size: int = 0) -> Classification: ...


# ---------------------------------------------------------------------- agent seams
@runtime_checkable
class ValidationVerdict(Protocol):
    """A snapshot validation's answer (`lagoon.context.ValidationReport`)."""

    ok: bool
    reasons: Sequence[Any]


@runtime_checkable
class SnapshotManager(Protocol):
    """What the context gate needs from `lagoon.context.ContextManager`."""

    def create_snapshot(self, task_id: str, chunks: Sequence[Any], assumptions: Sequence[Any] = (),
                        *, reason: str = "initial") -> Any:
        """A new snapshot of `chunks` declaring `assumptions` (`lagoon.context.Assumption`s),
        versioned one past `task_id`'s latest (1 for a new task), recording why it was taken."""
        ...

    def validate(self, snapshot: Any) -> ValidationVerdict: ...

    def mark_consumed(self, chunks: Sequence[Any], task_id: str | None = None) -> None:
        """The chunks were handed to a model now (their TTL starts)."""
        ...

    def invalidate_files(self, paths: Sequence[str]) -> None:
        """Every consumed chunk of these files is invalid at once (the files changed)."""
        ...


class Summarizer(Protocol):
    """Writes the long-term summary of a turn that memory evicts (`lagoon.agent.ModelSummarizer`)."""

    def summarize(self, turn: Turn) -> Summary:
        """The evicted turn's long-term summary (never raises: falls back to `turn.summary`)."""
        ...


class Tool(Protocol):
    """One tool the model may call (`lagoon.agent.tools`)."""

    name: str
    spec: ToolSpec

    def run(self, arguments: Mapping[str, Any]) -> ToolOutput: ...


class LockKeeper(Protocol):
    """Advisory per-file locks the edit tool takes (`lagoon.agent.session.SessionLocks`)."""

    def acquire(self, path: str) -> None:
        """Take (or re-take) the advisory lock on `path`; WorkspaceError when another session holds it."""
        ...


# ---------------------------------------------------------------------- engine seams
class CacheLike(Protocol):
    """The KV cache a transformer layer writes to and reads from (`lagoon.engine.kv_cache`)."""

    def update(
        self, layer: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...


class ExpertStore(Protocol):
    """Where offloaded MoE experts live (`lagoon.moe.expert_store`: host memory or a disk file)."""

    def read_into(self, layer: int, expert: int, gate_up_out: torch.Tensor, down_out: torch.Tensor) -> int:
        """Copy one expert's weights into the given buffers; returns the bytes read."""
        ...

    def close(self) -> None: ...
