"""`ModelSummarizer`: long-term memory summaries written by the model, under a token cap.

When memory evicts a turn it asks its summarizer for a `Summary`. This one sends the turn to the
run's model (the router or backend the loop already uses, through the `ChatModel` protocol) with
`prompts/summary.j2` as the system prompt, no tools, and `max_tokens` as the reply cap. The reply is
used when it arrives within `timeout_s`, is non-empty, and — counted with the model's own
`count_tokens` — fits `max_tokens` (a longer reply is cut at a word boundary until it fits). On any
error, an empty reply or a timeout the turn's extractive summary is used instead, and the `Summary`
says so (`source`, `error`), so the loop can record which was used.

A timed-out call is abandoned, not cancelled: its thread runs on in the background (daemon) and its
reply is dropped. This module does not decide *when* to summarise (memory does) and keeps no state
between calls.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import jinja2

from lagoon.agent.environment import cut_output
from lagoon.protocols import ChatMessage, ChatModel

if TYPE_CHECKING:
    from lagoon.agent.memory import Turn

__all__ = ["ModelSummarizer", "Summary"]

_PROMPTS = jinja2.Environment(loader=jinja2.PackageLoader("lagoon.agent", "prompts"),
                              undefined=jinja2.StrictUndefined)
_TURN_CHARS = 6000  # of the evicted turn shown to the summarizer (head and tail)


@dataclass
class Summary:
    """One evicted turn's long-term summary and where it came from (`model` or `extractive`)."""

    step: int
    text: str
    source: str
    error: str = ""
    usage: dict[str, Any] = field(default_factory=dict)
    asked_model: bool = False
    latency_s: float = 0.0  # wall time spent getting it (model call, waiting, fitting)

    def to_event(self) -> dict[str, Any]:
        return {"step": self.step, "summary": self.text, "source": self.source, "error": self.error,
                "asked_model": self.asked_model, "usage": dict(self.usage), "latency_s": round(self.latency_s, 4)}


def render_turn(turn: Turn) -> str:
    """The turn as plain text: the model's words and calls, then each observation."""
    lines = []
    for m in turn.messages:
        if m.role == "assistant":
            if m.content.strip():
                lines.append(f"Agent: {m.content.strip()}")
            lines += [f"Call: {c.name} {dict(c.arguments)}" for c in m.tool_calls]
        else:
            lines.append(f"Observation:\n{m.content}")
    text, _ = cut_output("\n".join(lines), _TURN_CHARS)
    return text


class ModelSummarizer:
    """`summarize(turn)` → `Summary`, by `model` within `max_tokens` and `timeout_s`."""

    def __init__(self, model: ChatModel, *, max_tokens: int = 80, timeout_s: float = 30.0) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        self.model = model
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.system = _PROMPTS.get_template("summary.j2").render(max_tokens=max_tokens).strip()

    def tokens(self, text: str) -> int:
        """`text`'s tokens in the model's tokenizer (the message's own overhead taken off)."""
        count = self.model.count_tokens
        return count([ChatMessage(role="user", content=text)]) - count([ChatMessage(role="user", content="")])

    def fit(self, text: str) -> str:
        """`text`, cut at a word boundary (and marked) until it takes at most `max_tokens` tokens."""
        if self.tokens(text) <= self.max_tokens:
            return text
        words = text.split()
        lo, hi = 0, len(words)  # the longest prefix that fits, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.tokens(" ".join(words[:mid]) + " …") <= self.max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[:lo]) + " …" if lo else ""

    def _ask(self, turn: Turn) -> tuple[str, dict[str, Any]]:
        messages = [ChatMessage(role="system", content=self.system),
                    ChatMessage(role="user", content=render_turn(turn))]
        box: dict[str, Any] = {}

        def call() -> None:
            try:
                box["response"] = self.model.chat(messages, tools=(), max_tokens=self.max_tokens)
            except BaseException as exc:  # noqa: BLE001 — reported to the caller, who falls back
                box["error"] = exc

        worker = threading.Thread(target=call, name=f"summary-step-{turn.step}", daemon=True)
        start = time.perf_counter()
        worker.start()
        worker.join(self.timeout_s)
        if worker.is_alive():
            raise TimeoutError(f"no summary within {self.timeout_s:g} s (agent.summary_timeout_s)")
        if "error" in box:
            exc = box["error"]
            raise RuntimeError(f"{type(exc).__name__}: {exc}") from exc
        response = box["response"]
        usage = {"input_tokens": response.usage.input_tokens, "output_tokens": response.usage.output_tokens,
                 "cost_usd": response.usage.cost_usd, "model": response.model,
                 "latency_s": round(time.perf_counter() - start, 4)}
        return response.message.content.strip(), usage

    def summarize(self, turn: Turn) -> Summary:
        start = time.perf_counter()
        summary = self._summarize(turn)
        summary.latency_s = time.perf_counter() - start
        return summary

    def _summarize(self, turn: Turn) -> Summary:
        try:
            text, usage = self._ask(turn)
        except Exception as exc:  # noqa: BLE001 — any failure falls back to the extractive line
            return Summary(turn.step, turn.summary, "extractive", error=str(exc)[:300], asked_model=True)
        text = " ".join(text.split())
        if not text:
            return Summary(turn.step, turn.summary, "extractive", error="the model returned an empty summary",
                           usage=usage, asked_model=True)
        line = self.fit(f"step {turn.step}: {text}")
        if not line:
            return Summary(turn.step, turn.summary, "extractive", usage=usage, asked_model=True,
                           error=f"agent.summary_max_tokens={self.max_tokens} holds no words")
        return Summary(turn.step, line, "model", usage=usage, asked_model=True)
