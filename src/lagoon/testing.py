"""Test doubles that ship with Lagoon: real, registered implementations, not patches.

- `ScriptedChatModel`: a deterministic `ChatModel` that replays a script of replies (text or tool
  calls) and records every request it saw. Its token count is a whitespace/punctuation estimate.
- `approx_token_count`: the estimate used where a backend has no tokenizer.

Parts that need torch add their own doubles (tiny model presets) in their packages' test helpers;
this module imports nothing heavy.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lagoon.protocols import ChatMessage, ChatResponse, ToolCall, ToolSpec, Usage

__all__ = ["ScriptedChatModel", "ScriptStep", "approx_token_count"]

_TOKEN_RE = re.compile(r"\w+|[^\w\s]")


def approx_token_count(text: str) -> int:
    """Words and punctuation marks: close to BPE counts for code and English (within ~30%)."""
    return len(_TOKEN_RE.findall(text))


@dataclass(frozen=True)
class ScriptStep:
    """One scripted reply: text, and/or a tool call `(name, arguments)`."""

    content: str = ""
    tool: tuple[str, dict[str, Any]] | None = None


Reply = ScriptStep | str | Callable[[Sequence[ChatMessage]], ScriptStep | str]


@dataclass
class ScriptedChatModel:
    """Replays `script` in order; a callable entry computes its reply from the messages.

    When the script runs out it raises `IndexError` unless `repeat_last` is set. Every call's
    messages are kept in `requests` so tests can check what the model was shown."""

    script: Sequence[Reply]
    name: str = "scripted"
    window: int = 32768
    repeat_last: bool = False
    requests: list[list[ChatMessage]] = field(default_factory=list)
    _ids: Any = field(default_factory=lambda: itertools.count(1), repr=False)

    @property
    def context_window(self) -> int:
        return self.window

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return sum(approx_token_count(m.content) + 4 for m in messages)

    def chat(
        self,
        messages: Sequence[ChatMessage],
        *,
        tools: Sequence[ToolSpec] = (),
        max_tokens: int | None = None,
        temperature: float | None = None,
    ) -> ChatResponse:
        i = len(self.requests)
        self.requests.append(list(messages))
        if i >= len(self.script):
            if not self.repeat_last or not self.script:
                raise IndexError(f"ScriptedChatModel ran out of replies after {len(self.script)} steps")
            i = len(self.script) - 1
        step = self.script[i]
        if callable(step):
            step = step(messages)
        if isinstance(step, str):
            step = ScriptStep(content=step)
        calls: tuple[ToolCall, ...] = ()
        if step.tool is not None:
            calls = (ToolCall(id=f"call_{next(self._ids)}", name=step.tool[0], arguments=step.tool[1]),)
        message = ChatMessage(role="assistant", content=step.content, tool_calls=calls)
        usage = Usage(self.count_tokens(messages), approx_token_count(step.content) + 8 * len(calls))
        return ChatResponse(
            message=message,
            model=self.name,
            usage=usage,
            finish_reason="tool_calls" if calls else "stop",
            backend=self.name,
        )

    @classmethod
    def of(cls, replies: Iterable[Reply], **kw: Any) -> ScriptedChatModel:
        return cls(script=list(replies), **kw)
