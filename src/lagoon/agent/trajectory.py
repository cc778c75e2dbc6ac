"""`Trajectory`: what a session's events add up to — counters, open tool calls, and memory turns.

The live loop and a resumed session go through the same `apply(kind, payload)`, so a resume
rebuilds exactly what the original run knew: step and token counts, cost, backends used, commands
and exit codes, validation failures, the context version, and the memory turns. Event kinds:

    task              {task, session_id}
    context           {version, reasons, chunks, assumptions}  a new snapshot version (reasons: why)
    assumption        {name, claim, check, kind, source,       an assumption's check result changed
                       was, holds, at, detail, version}       (drift when it no longer holds)
    validation        {ok, version, reasons, consecutive}
    model             {step, message, calls, mode, usage, backend, model, latency_s, route}
    format_error      {step, error}
    tool_intent       {step, call_id, name, arguments}       written before the tool runs
    tool_result       {step, call_id, name, text, ok, exit_code, files, meta}
    tool_interrupted  {step, call_id, name, arguments}       an intent found without its result on resume
    memory            {step, summary, source, error,          a turn evicted to long-term memory, with the
                       asked_model, usage}                    summary it got (`model` or `extractive`)
    exit              {status, message}

`pending()` splits the last model event's calls into those interrupted by a crash (intent, no
result: never re-run) and those not yet started (safe to run).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from lagoon.agent.memory import Memory
from lagoon.protocols import ChatMessage, ToolCall

__all__ = ["Trajectory", "message_to_dict", "message_from_dict", "INTERRUPTED_TEXT"]

INTERRUPTED_TEXT = (
    "[this call was interrupted: the agent process stopped while it ran. It was NOT re-run and its "
    "effects are unknown; check the state (e.g. git status, view the file) before going on]"
)


def message_to_dict(m: ChatMessage) -> dict[str, Any]:
    return {
        "role": m.role,
        "content": m.content,
        "tool_calls": [{"id": c.id, "name": c.name, "arguments": dict(c.arguments)} for c in m.tool_calls],
    }


def message_from_dict(d: dict[str, Any]) -> ChatMessage:
    calls = tuple(ToolCall(c["id"], c["name"], c.get("arguments") or {}) for c in d.get("tool_calls") or ())
    return ChatMessage(role=d["role"], content=d.get("content") or "", tool_calls=calls)


@dataclass
class Trajectory:
    memory: Memory | None = None
    steps: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    model_latency_s: float = 0.0
    backends: Counter = field(default_factory=Counter)
    models: Counter = field(default_factory=Counter)
    commands: list[dict[str, Any]] = field(default_factory=list)
    validation_failures: int = 0
    assumption_drift: int = 0
    last_validation_ok: bool = True
    context_version: int = 0
    format_errors_in_row: int = 0
    interrupted: list[dict[str, Any]] = field(default_factory=list)
    exit: dict[str, Any] | None = None
    events: int = 0
    summaries: Counter = field(default_factory=Counter)  # source → evicted turns summarised that way
    summary_calls: int = 0  # model calls made for summaries (a replayed script counts them too)
    _open: dict[str, Any] | None = None
    _results: list[dict[str, Any]] = field(default_factory=list)
    _intents: set[tuple[int, str]] = field(default_factory=set)  # (step, call_id): ids may repeat across steps
    _done: set[tuple[int, str]] = field(default_factory=set)

    def apply(self, kind: str, payload: dict[str, Any]) -> None:
        self.events += 1
        handler = getattr(self, f"_on_{kind}", None)
        if handler is not None:
            handler(payload)

    def _on_context(self, p: dict[str, Any]) -> None:
        self.context_version = int(p["version"])

    def _on_assumption(self, p: dict[str, Any]) -> None:
        if p["holds"] is False:
            self.assumption_drift += 1

    def _on_validation(self, p: dict[str, Any]) -> None:
        self.last_validation_ok = bool(p["ok"])
        if not p["ok"]:
            self.validation_failures += 1

    def _on_model(self, p: dict[str, Any]) -> None:
        self.steps += 1
        usage = p.get("usage") or {}
        self.input_tokens += int(usage.get("input_tokens", 0))
        self.output_tokens += int(usage.get("output_tokens", 0))
        self.cost_usd += float(usage.get("cost_usd", 0.0))
        self.model_latency_s += float(p.get("latency_s", 0.0))
        self.backends[p.get("backend") or p.get("model") or "unknown"] += 1
        self.models[p.get("model") or "unknown"] += 1
        self._open = p
        self._results = []

    def _on_memory(self, p: dict[str, Any]) -> None:
        self.summaries[p["source"]] += 1
        if p.get("asked_model"):
            self.summary_calls += 1
            usage = p.get("usage") or {}
            self.input_tokens += int(usage.get("input_tokens", 0))
            self.output_tokens += int(usage.get("output_tokens", 0))
            self.cost_usd += float(usage.get("cost_usd", 0.0))
        if self.memory is not None:
            self.memory.remember_summary(int(p["step"]), p["summary"])

    def _on_format_error(self, p: dict[str, Any]) -> None:
        self.format_errors_in_row += 1
        if self.memory is not None and self._open is not None:
            msgs = [message_from_dict(self._open["message"]), ChatMessage(role="user", content=f"Format error: {p['error']}")]
            self.memory.add_turn(int(p["step"]), msgs, tool="format_error", output=p["error"], ok=False)
        self._open = None

    def _on_tool_intent(self, p: dict[str, Any]) -> None:
        self._intents.add((int(p["step"]), p["call_id"]))

    def _on_tool_result(self, p: dict[str, Any]) -> None:
        self.format_errors_in_row = 0
        if p.get("exit_code") is not None:
            self.commands.append({"command": p["arguments"].get("command", ""), "exit_code": p["exit_code"]})
        self._close(p)

    def _on_tool_interrupted(self, p: dict[str, Any]) -> None:
        self.interrupted.append({"step": p["step"], "name": p["name"], "arguments": p["arguments"]})
        self._close({**p, "text": INTERRUPTED_TEXT, "ok": False, "exit_code": None, "meta": {}})

    def _on_exit(self, p: dict[str, Any]) -> None:
        self.exit = p

    def _close(self, p: dict[str, Any]) -> None:
        self._done.add((int(p["step"]), p["call_id"]))
        self._results.append(p)
        if self._open is not None and all(self._key(c) in self._done for c in self._open["calls"]):
            self._memorize(self._open, self._results)
            self._open = None

    def _memorize(self, model: dict[str, Any], results: list[dict[str, Any]]) -> None:
        if self.memory is None:
            return
        assistant = message_from_dict(model["message"])
        if model.get("mode") == "tools":
            msgs = [assistant, *(ChatMessage(role="tool", content=r["text"], tool_call_id=r["call_id"]) for r in results)]
        else:
            msgs = [assistant, *(ChatMessage(role="user", content=f"Observation:\n{r['text']}") for r in results)]
        states = [(f, r["meta"]["file_state"]) for r in results for f in r.get("files", [])[:1]
                  if (r.get("meta") or {}).get("file_state")]
        exit_codes = [r["exit_code"] for r in results if r.get("exit_code") is not None]
        self.memory.add_turn(
            int(model["step"]),
            msgs,
            tool="+".join(r["name"] for r in results),
            arguments=results[0]["arguments"] if len(results) == 1 else {"calls": [r["arguments"] for r in results]},
            output="\n".join(r["text"] for r in results),
            ok=all(r.get("ok", True) for r in results),
            exit_code=exit_codes[-1] if exit_codes else None,
            edit=any((r.get("meta") or {}).get("edit") for r in results),
            file_path=states[-1][0] if states else None,
            file_state=states[-1][1] if states else None,
        )

    def pending(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(interrupted, unstarted) calls of the open model event, each {id, name, arguments}."""
        if self._open is None:
            return [], []
        open_calls = [c for c in self._open["calls"] if self._key(c) not in self._done]
        interrupted = [c for c in open_calls if self._key(c) in self._intents]
        unstarted = [c for c in open_calls if self._key(c) not in self._intents]
        return interrupted, unstarted

    def _key(self, call: dict[str, Any]) -> tuple[int, str]:
        assert self._open is not None
        return int(self._open["step"]), call["id"]

    @property
    def open_step(self) -> int | None:
        return int(self._open["step"]) if self._open is not None else None
