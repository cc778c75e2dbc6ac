"""`Memory`: builds each prompt from three tiers, never past `memory.context_budget` tokens.

- Short-term: the recent turns verbatim (a turn = the model's message and its tool results).
  When a later view or edit shows a file again, older turns' copies of it are masked — the latest
  state replaces older ones.
- Mid-term: the latest state of each file touched, shown once its turn has left short-term.
- Long-term: one-line extractive summaries of evicted turns (tool, arguments, exit code, first
  error line), or a caller-supplied `summarizer` (e.g. a model) when given.

Each turn gets an importance score: errors, edits and test runs score high; repeated commands and
bulky successful output score low. When the rendered prompt is over budget, turns are evicted into
long-term memory — lowest importance first (`semantic_importance`) or oldest first (`fifo`) — then
old summaries, file states and retrieved chunks are dropped, and as a last resort the newest
turn's tool output is cut. The budget is checked with `count_tokens` on the final rendered
messages (the backend's tokenizer), so it is a hard cap; if even the system prompt and task do
not fit, `ContextWindowExceededError` says so.

Memory is *not* persisted: on resume the loop replays the session's events into a fresh Memory.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from lagoon.agent.environment import cut_output
from lagoon.config import TruncationStrategy
from lagoon.errors import ContextWindowExceededError
from lagoon.protocols import ChatMessage

__all__ = ["Memory", "Turn", "score_turn"]

_TEST_RE = re.compile(r"\b(pytest|unittest|tox|nox|npm (run )?test|cargo test|go test|make test|jest)\b")
_ERROR_RE = re.compile(r"Traceback|Error\b|error:|FAILED|failed|exception", re.IGNORECASE)
_BULKY_CHARS = 4000
MASKED = "[older copy of {path} masked; a later step shows its current state]"


@dataclass
class Turn:
    """One step's messages, with what memory needs to rank, summarise and mask it."""

    step: int
    messages: list[ChatMessage]
    importance: float = 1.0
    summary: str = ""
    file_path: str | None = None
    file_state: str | None = None
    tokens: int = 0


def score_turn(*, tool: str, arguments: str, output: str, ok: bool, edit: bool, repeated: bool) -> float:
    """Higher is kept longer under `semantic_importance`."""
    score = 1.0
    is_error = not ok or bool(_ERROR_RE.search(output[:2000]))
    if is_error:
        score += 3.0
    if edit:
        score += 3.0
    if tool == "bash" and _TEST_RE.search(arguments):
        score += 2.0
    if repeated:
        score -= 1.5
    if len(output) > _BULKY_CHARS and not is_error:
        score -= 1.0
    return score


def _extract(step: int, tool: str, arguments: str, output: str, exit_code: int | None) -> str:
    first_error = next((ln.strip() for ln in output.splitlines() if _ERROR_RE.search(ln)), "")
    first_line = next((ln.strip() for ln in output.splitlines() if ln.strip()), "")
    code = f" → exit {exit_code}" if exit_code is not None else ""
    detail = first_error or first_line
    return f"step {step}: {tool} {arguments[:120]}{code}; {detail[:160]}".rstrip("; ")


@dataclass
class Memory:
    """Three-tier prompt memory under a hard token budget."""

    count_tokens: Callable[[Sequence[ChatMessage]], int]
    budget: int
    strategy: TruncationStrategy = TruncationStrategy.SEMANTIC_IMPORTANCE
    system: str = ""
    task: str = ""
    summarizer: Callable[[Turn], str] | None = None
    turns: list[Turn] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    evicted: int = 0
    _seen: set[str] = field(default_factory=set)

    # -- recording ----------------------------------------------------------------------------
    def add_turn(
        self,
        step: int,
        messages: list[ChatMessage],
        *,
        tool: str = "",
        arguments: dict | None = None,
        output: str = "",
        ok: bool = True,
        exit_code: int | None = None,
        edit: bool = False,
        file_path: str | None = None,
        file_state: str | None = None,
    ) -> Turn:
        args = json.dumps(arguments or {}, sort_keys=True)
        key = hashlib.sha1(f"{tool}\0{args}\0{output}".encode()).hexdigest()
        repeated = key in self._seen
        self._seen.add(key)
        turn = Turn(
            step=step,
            messages=list(messages),
            importance=score_turn(tool=tool, arguments=args, output=output, ok=ok, edit=edit, repeated=repeated),
            summary=_extract(step, tool or "reply", args if tool else "", output, exit_code),
            file_path=file_path,
            file_state=file_state,
        )
        if file_path is not None and file_state is not None:
            self._mask_older(file_path)
            self.files[file_path] = (step, file_state)
            self.files = dict(sorted(self.files.items(), key=lambda kv: kv[1][0]))
        turn.tokens = self.count_tokens(turn.messages)
        self.turns.append(turn)
        return turn

    def _mask_older(self, path: str) -> None:
        for turn in self.turns:
            if turn.file_path != path:
                continue
            turn.messages = [
                replace(m, content=MASKED.format(path=path)) if m.role in ("tool", "user") else m
                for m in turn.messages
            ]
            turn.file_path = None
            turn.tokens = self.count_tokens(turn.messages)

    # -- rendering ----------------------------------------------------------------------------
    def _header(self, context: list[str]) -> ChatMessage:
        parts = [f"Task:\n{self.task}"]
        if context:
            parts.append("Relevant code:\n" + "\n".join(context))
        if self.summaries:
            parts.append("Earlier steps (summarised):\n" + "\n".join(self.summaries))
        live = {t.step for t in self.turns}
        states = [f"{p} (as of step {s}):\n{text}" for p, (s, text) in self.files.items() if s not in live]
        if states:
            parts.append("Current state of files you touched:\n" + "\n\n".join(states))
        return ChatMessage(role="user", content="\n\n".join(parts))

    def _evict_one(self) -> bool:
        """Move one turn (never the newest) into long-term memory; False when none is left."""
        if len(self.turns) <= 1:
            return False
        candidates = self.turns[:-1]
        if self.strategy is TruncationStrategy.FIFO:
            victim = candidates[0]
        else:
            victim = min(candidates, key=lambda t: (t.importance, t.step))
        self.turns.remove(victim)
        self.summaries.append(self.summarizer(victim) if self.summarizer else victim.summary)
        self.evicted += 1
        return True

    def render(self, context: Sequence[str] = ()) -> list[ChatMessage]:
        """The prompt: system, header (task, code, summaries, file states), recent turns — within budget."""
        chunks = list(context)
        system = [ChatMessage(role="system", content=self.system)] if self.system else []
        fixed = self.count_tokens([*system, ChatMessage(role="user", content=f"Task:\n{self.task}")])
        if fixed > self.budget:
            raise ContextWindowExceededError(
                f"the system prompt and task alone take {fixed} tokens, over memory.context_budget "
                f"({self.budget}); raise the budget or shorten the task",
                needed=fixed,
                window=self.budget,
            )
        while True:
            header = self._header(chunks)
            estimate = self.count_tokens([*system, header]) + sum(t.tokens for t in self.turns)
            if estimate <= self.budget:
                messages = [*system, header, *(m for t in self.turns for m in t.messages)]
                if self.count_tokens(messages) <= self.budget:
                    return messages
            if not self._shrink(chunks):
                raise ContextWindowExceededError(
                    f"cannot fit the prompt in memory.context_budget ({self.budget} tokens) even after "
                    "evicting everything optional; raise the budget",
                    needed=estimate,
                    window=self.budget,
                )

    def _shrink(self, chunks: list[str]) -> bool:
        """Drop the next thing in eviction order; False when nothing is left to drop."""
        if self._evict_one():
            return True
        if self.summaries:
            del self.summaries[0]
            return True
        live = {t.step for t in self.turns}
        stale = [p for p, (s, _) in self.files.items() if s not in live]
        if stale:
            del self.files[stale[0]]
            return True
        if chunks:
            chunks.pop()
            return True
        return self._cut_last_turn()

    def _cut_last_turn(self) -> bool:
        if not self.turns:
            return False
        turn = self.turns[-1]
        for i in range(len(turn.messages) - 1, -1, -1):
            m = turn.messages[i]
            if len(m.content) > 200:
                cut, _ = cut_output(m.content, len(m.content) // 2)
                turn.messages[i] = replace(m, content=cut)
                turn.tokens = self.count_tokens(turn.messages)
                return True
        return False
