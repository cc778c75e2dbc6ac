"""`Memory`: builds each prompt from three tiers, never past `memory.context_budget` tokens.

- Short-term: the recent turns verbatim (a turn = the model's message and its tool results).
  When a later view or edit shows a file again, older turns' copies of it are masked — the latest
  state replaces older ones.
- Mid-term: the latest state of each file touched, shown once its turn has left short-term.
- Long-term: summaries of evicted turns — written by the model through a `summarizer`
  (`lagoon.agent.summarizer.ModelSummarizer`) when one is given, else (and whenever it fails) one
  extractive line: tool, arguments, exit code, first error line. Every eviction is queued in
  `evictions` (step, summary, source) for the loop to record; `known_summaries` (filled on resume
  from those records) are reused instead of asking again.

Each turn gets an importance score: errors, edits and test runs score high; repeated commands and
bulky successful output score low. When the rendered prompt is over budget, turns are evicted into
long-term memory — lowest importance first (`semantic_importance`) or oldest first (`fifo`) — then
old summaries, file states and retrieved chunks are dropped, and as a last resort the newest
turn's tool output is cut. The budget is checked on the final rendered messages in the backend's
tokens (`count_tokens`, through a `TokenCounter` that counts each message once and the whole list
whenever the counter is not additive), so it is a hard cap; if even the system prompt and task do
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
from lagoon.agent.summarizer import Summary
from lagoon.agent.token_counter import TokenCounter
from lagoon.config import TruncationStrategy
from lagoon.errors import ContextWindowExceededError
from lagoon.protocols import ChatMessage, Summarizer

__all__ = ["Memory", "Turn", "Summarizer", "score_turn"]

_TEST_RE = re.compile(r"\b(pytest|unittest|tox|nox|npm (run )?test|cargo test|go test|make test|jest)\b")
_ERROR_RE = re.compile(r"Traceback|Error\b|error:|FAILED|failed|exception", re.IGNORECASE)
_BULKY_CHARS = 4000
_EMPTY = ChatMessage(role="user", content="")
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
    hit = _ERROR_RE.search(output)  # one scan; then the line around the first match
    if hit is not None:
        start = output.rfind("\n", 0, hit.start()) + 1
        end = output.find("\n", hit.end())
        first_error = output[start:end if end >= 0 else len(output)].strip()
    else:
        first_error = ""
    stripped = output.lstrip()
    first_line = stripped[:stripped.find("\n")].strip() if "\n" in stripped else stripped.strip()
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
    summarizer: Summarizer | None = None
    turns: list[Turn] = field(default_factory=list)
    summaries: list[str] = field(default_factory=list)
    files: dict[str, tuple[int, str]] = field(default_factory=dict)
    evicted: int = 0
    evictions: list[Summary] = field(default_factory=list)
    """Evictions not yet taken by the loop (`take_evictions`), oldest first."""
    known_summaries: dict[int, str] = field(default_factory=dict)
    """step → summary already written for it (replayed on resume): reused, not asked again."""
    counter: TokenCounter = field(init=False, repr=False)
    _seen: set[str] = field(default_factory=set)
    _bias: int = 0  # whole-list count minus the per-message sum, last seen (non-additive counters)

    def __post_init__(self) -> None:
        self.counter = TokenCounter(self.count_tokens)

    def take_evictions(self) -> list[Summary]:
        out, self.evictions = self.evictions, []
        return out

    def remember_summary(self, step: int, text: str) -> None:
        self.known_summaries[step] = text

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
            self.files.pop(file_path, None)  # re-inserted last: the dict stays in step order
            self.files[file_path] = (step, file_state)
        turn.tokens = self.counter.many(turn.messages)
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
            turn.tokens = self.counter.many(turn.messages)

    # -- rendering ----------------------------------------------------------------------------
    def _header_pieces(self, context: list[str]) -> list[str]:
        """The header's lines: task, code, summaries, file states (blank pieces between sections)."""
        pieces = ["Task:", self.task]
        if context:
            pieces += ["", "Relevant code:", *context]
        if self.summaries:
            pieces += ["", "Earlier steps (summarised):", *self.summaries]
        live = {t.step for t in self.turns}
        states = [f"{p} (as of step {s}):\n{text}" for p, (s, text) in self.files.items() if s not in live]
        if states:
            pieces += ["", "Current state of files you touched:"]
            for i, state in enumerate(states):
                pieces += [state] if i == 0 else ["", state]
        return pieces

    def _header(self, context: list[str]) -> ChatMessage:
        return ChatMessage(role="user", content="\n".join(self._header_pieces(context)))

    def _evict_one(self) -> int | None:
        """Move one turn (never the newest) into long-term memory and return about how many
        tokens that frees; None when no turn is left to evict."""
        if len(self.turns) <= 1:
            return None
        candidates = self.turns[:-1]
        if self.strategy is TruncationStrategy.FIFO:
            victim = candidates[0]
        else:
            victim = min(candidates, key=lambda t: (t.importance, t.step))
        self.turns.remove(victim)
        text = self.known_summaries.get(victim.step)
        if text is None:
            summary = (self.summarizer.summarize(victim) if self.summarizer is not None
                       else Summary(victim.step, victim.summary, "extractive"))
            text = self.known_summaries[victim.step] = summary.text
            self.evictions.append(summary)
        self.summaries.append(text)
        self.evicted += 1
        line = self.counter.one(ChatMessage(role="user", content=text)) - self.counter.one(_EMPTY)
        return victim.tokens - line

    def render(self, context: Sequence[str] = ()) -> list[ChatMessage]:
        """The prompt: system, header (task, code, summaries, file states), recent turns — within budget."""
        chunks = list(context)
        system = [ChatMessage(role="system", content=self.system)] if self.system else []
        task = ChatMessage(role="user", content=f"Task:\n{self.task}")
        self.counter.probe([*system, task] if system else [task, task])
        fixed = self.counter.whole([*system, task])
        if fixed > self.budget:
            raise ContextWindowExceededError(
                f"the system prompt and task alone take {fixed} tokens, over memory.context_budget "
                f"({self.budget}); raise the budget or shorten the task",
                needed=fixed,
                window=self.budget,
            )
        self.counter.probe_text("user", ["Task:", self.task])
        while True:
            pieces = self._header_pieces(chunks)
            header = ChatMessage(role="user", content="\n".join(pieces))
            # counted piece by piece when the counter is additive over lines (probed), so an
            # eviction's new summary line does not re-tokenize the retrieved code
            estimate = (self.counter.many(system) + self.counter.joined("user", pieces)
                        + sum(t.tokens for t in self.turns))
            total = estimate if self.counter.additive else estimate + self._bias
            if total <= self.budget:
                messages = [*system, header, *(m for t in self.turns for m in t.messages)]
                if not self.counter.additive:  # count the list whole; learn how far the sum was off
                    total = self.counter.whole(messages)
                    self._bias = total - estimate
                if total <= self.budget:
                    return messages
            if not self._shrink(chunks, total - self.budget):
                raise ContextWindowExceededError(
                    f"cannot fit the prompt in memory.context_budget ({self.budget} tokens) even after "
                    "evicting everything optional; raise the budget",
                    needed=total,
                    window=self.budget,
                )

    def _shrink(self, chunks: list[str], deficit: int) -> bool:
        """Drop what comes next in eviction order — turns until about `deficit` tokens are freed,
        else one summary, file state or chunk; False when nothing is left to drop."""
        freed, evicted = 0, False
        while freed < deficit:
            gained = self._evict_one()
            if gained is None:
                break
            freed, evicted = freed + gained, True
        if evicted:
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
                turn.tokens = self.counter.many(turn.messages)
                return True
        return False
