"""Test doubles that ship with Lagoon: real, registered implementations, not patches.

- `ScriptedChatModel`: a deterministic `ChatModel` that replays a script of replies (text or tool
  calls) and records every request it saw. Its token count is a whitespace/punctuation estimate.
- `approx_token_count`: re-exported from `lagoon.token_estimate` for tests.

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
from lagoon.token_estimate import approx_token_count

__all__ = [
    "ScriptedChatModel",
    "ScriptStep",
    "approx_token_count",
    "ReplayChatModel",
    "WholeFileRetriever",
    "FileHashSnapshots",
    "FileChunk",
    "HashSnapshot",
]

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


# ---------------------------------------------------------------------------------------------
# Agent doubles: a script read from a file (resumable), a whole-file retriever, file-hash snapshots
# ---------------------------------------------------------------------------------------------


def _script_entry(entry: Any) -> ScriptStep | str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and "bash" in entry:
        return ScriptStep(content=str(entry.get("content", "")), tool=("bash", {"command": entry["bash"]}))
    if isinstance(entry, dict) and ("tool" in entry or "content" in entry):
        tool = entry.get("tool")
        return ScriptStep(content=str(entry.get("content", "")), tool=(tool[0], dict(tool[1])) if tool else None)
    raise ValueError(f"script entry {entry!r}: use a string, {{'bash': CMD}} or {{'tool': [NAME, ARGS]}}")


class ReplayChatModel:
    """A `ScriptedChatModel` whose script can come from a JSON file, and that can continue a session.

    `start=n` makes the first reply the script's entry `n`: a resumed session already holds `n`
    replies (`lagoon.agent.runner.model_replies` counts them). File format: a JSON list whose
    entries are a string (a text reply), ``{"bash": CMD}`` or ``{"tool": [NAME, ARGS], "content": TEXT}``."""

    def __init__(self, script: Sequence[Reply], *, name: str = "scripted", window: int = 32768,
                 repeat_last: bool = False, start: int = 0) -> None:
        self.script = list(script)
        self.name = name
        self.offset = start
        self.inner = ScriptedChatModel(self.script[start:], name=name, window=window, repeat_last=repeat_last)

    @classmethod
    def from_file(cls, path: str, **kw: Any) -> ReplayChatModel:
        import json
        from pathlib import Path

        try:
            data = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            from lagoon.errors import ConfigError

            raise ConfigError(f"scripted model file {path}: cannot read a JSON list ({exc})") from exc
        if not isinstance(data, list):
            from lagoon.errors import ConfigError

            raise ConfigError(f"scripted model file {path}: the top level must be a JSON list of replies")
        return cls([_script_entry(e) for e in data], **kw)

    @property
    def context_window(self) -> int:
        return self.inner.context_window

    @property
    def requests(self) -> list[list[ChatMessage]]:
        return self.inner.requests

    def count_tokens(self, messages: Sequence[ChatMessage]) -> int:
        return self.inner.count_tokens(messages)

    def chat(self, messages: Sequence[ChatMessage], **kw: Any) -> ChatResponse:
        return self.inner.chat(messages, **kw)


@dataclass(frozen=True)
class FileChunk:
    path: str
    start_line: int
    end_line: int
    symbol: str | None
    text: str


class WholeFileRetriever:
    """A `Retriever` over a folder's files of one suffix, ranked by how many query words each holds."""

    def __init__(self, root: Any, suffix: str = ".py", k: int = 3) -> None:
        from pathlib import Path

        self.root = Path(root)
        self.suffix = suffix
        self.k = k
        self.calls = 0

    def retrieve(self, query: str, *, k: int | None = None, budget_tokens: int | None = None) -> list[FileChunk]:
        self.calls += 1
        words = {w.lower() for w in re.findall(r"\w+", query) if w.isalnum()}
        scored = []
        for p in sorted(self.root.rglob(f"*{self.suffix}")):
            if any(part.startswith(".") for part in p.relative_to(self.root).parts):
                continue
            text = p.read_text(encoding="utf-8", errors="replace")
            score = sum(text.lower().count(w) for w in words)
            scored.append((-score, str(p.relative_to(self.root)), text))
        scored.sort()
        out = [FileChunk(rel, 1, max(1, text.count("\n")), None, text) for _, rel, text in scored[: k or self.k]]
        if budget_tokens is not None:
            kept, used = [], 0
            for c in out:
                used += approx_token_count(c.text)
                if used > budget_tokens:
                    break
                kept.append(c)
            out = kept
        return out


@dataclass
class _Report:
    ok: bool
    reasons: list[str]


@dataclass
class HashSnapshot:
    task_id: str
    version: int
    hashes: dict[str, str]
    assumptions: tuple[Any, ...] = ()
    reason: str = "initial"


class FileHashSnapshots:
    """A snapshot manager double: a snapshot is the SHA-256 of each retrieved file; it is stale when
    one changed, or when an assumption it declares does not hold (unless `reject_unverified` is
    off). Versions count per task id. `always_fail` makes every validation fail. `consumed` maps
    each chunk location handed to the model to when."""

    def __init__(self, root: Any, *, always_fail: bool = False, reject_unverified: bool = True) -> None:
        from pathlib import Path

        self.root = Path(root)
        self.always_fail = always_fail
        self.reject_unverified = reject_unverified
        self.validations = 0
        self.latest: dict[str, int] = {}
        self.consumed: dict[str, float] = {}

    def _hashes(self, paths: Iterable[str]) -> dict[str, str]:
        import hashlib

        out = {}
        for rel in paths:
            p = self.root / rel
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else ""
        return out

    def create_snapshot(self, task_id: str, chunks: Sequence[Any], assumptions: Sequence[Any] = (),
                        *, reason: str = "initial") -> HashSnapshot:
        version = self.latest.get(task_id, 0) + 1
        self.latest[task_id] = version
        return HashSnapshot(task_id, version, self._hashes(c.path for c in chunks), tuple(assumptions), reason)

    def mark_consumed(self, chunks: Sequence[Any], task_id: str | None = None) -> None:
        import time

        for c in chunks:
            self.consumed[f"{c.path}:{c.start_line}-{c.end_line}"] = time.time()

    def invalidate_files(self, paths: Sequence[str]) -> None:
        for key in [k for k in self.consumed if k.rsplit(":", 1)[0] in paths]:
            del self.consumed[key]

    def validate(self, snapshot: HashSnapshot) -> _Report:
        self.validations += 1
        if self.always_fail:
            return _Report(False, ["assumption 'tests pass on main' is unverified"])
        now = self._hashes(snapshot.hashes)
        changed = [p for p, h in snapshot.hashes.items() if now.get(p) != h]
        reasons = [f"{p} changed since snapshot v{snapshot.version}" for p in changed]
        if self.reject_unverified:
            reasons += [f"unverified_assumptions: {a.name}" for a in snapshot.assumptions if a.holds is not True]
        return _Report(not reasons, reasons)
