"""The agent loop: validate context → assemble prompt → ask the model → run the tool → record.

Everything is injected (model, tools, memory, context gate, session store); the loop only orders
the work and keeps the books. Control flow is by exceptions that carry a message:

    Submitted       the model called `submit`                      → exit status "submitted"
    LimitsExceeded  step, cost or time limit reached                → "limits_exceeded"
    FormatError     a reply held no usable action (bounded: after   → "format_error"
                    `agent.max_format_errors` in a row the run ends)
    ValidationHalt  `validation.max_consecutive_validation_failures` → "validation_halt"
                    failed context validations in a row

Every event is committed to the session before the next action, and a tool call is written as
`tool_intent` before it runs and `tool_result` after, so a crash is always detectable on resume.
A `LagoonError` from the model ends the run with status "model_error"; any other exception
propagates (the session stays resumable).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from lagoon.agent.context_gate import ContextGate
from lagoon.agent.memory import Memory
from lagoon.agent.parser import ReplyFormatError, parse_actions
from lagoon.agent.session import SessionStore
from lagoon.agent.tools import ToolBox
from lagoon.agent.trajectory import Trajectory, message_to_dict
from lagoon.config import AgentSection
from lagoon.errors import LagoonError
from lagoon.protocols import ChatModel, RoutedModel

__all__ = ["Agent", "AgentExit", "Submitted", "LimitsExceeded", "FormatError", "ValidationHalt"]


class AgentExit(Exception):
    """Ends the run; `status` names how."""

    status = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Submitted(AgentExit):
    status = "submitted"


class LimitsExceeded(AgentExit):
    status = "limits_exceeded"


class FormatError(AgentExit):
    status = "format_error"


class ValidationHalt(AgentExit):
    status = "validation_halt"


class Agent:
    def __init__(
        self,
        model: ChatModel,
        tools: ToolBox,
        memory: Memory,
        gate: ContextGate,
        store: SessionStore,
        session_id: str,
        limits: AgentSection,
        *,
        trajectory: Trajectory,
        persist_tool_state: bool = True,
        telemetry: Any = None,
        on_event: Callable[[str, Mapping[str, Any]], None] | None = None,
    ) -> None:
        self.model, self.tools, self.memory, self.gate = model, tools, memory, gate
        self.store, self.session_id, self.limits = store, session_id, limits
        self.trajectory = trajectory
        self.persist_tool_state = persist_tool_state
        self.telemetry = telemetry
        self.on_event = on_event
        self.started = time.monotonic()

    # -- bookkeeping --------------------------------------------------------------------------
    def emit(self, kind: str, payload: dict[str, Any]) -> int:
        """Commit the event, then apply it (the same path a resume replays)."""
        clean = self.store.redactor.scrub(payload)
        seq = self.store.append(self.session_id, kind, clean)
        self._apply(kind, clean, seq)
        return seq

    def _apply(self, kind: str, clean: dict[str, Any], seq: int) -> None:
        self.trajectory.apply(kind, clean)
        if self.on_event is not None:
            self.on_event(kind, {**clean, "seq": seq})

    def _count(self, name: str, labels: Mapping[str, str] | None = None) -> None:
        if self.telemetry is not None:
            self.telemetry.inc(name, labels=labels)

    def record_snapshots(self) -> None:
        """Each snapshot the gate took since the last call: into the session store and the events."""
        for rec in self.gate.take_snapshots():
            self.store.record_snapshot(self.session_id, rec.version, rec.to_dict())
            self.emit("context", {"version": rec.version, "reasons": [rec.reason], "chunks": list(rec.chunks),
                                  "assumptions": {a.name: a.holds for a in rec.assumptions}})

    def _record_drift(self, gate: Any) -> None:
        drifted = sum(1 for d in gate.drift if d.assumption.holds is False)
        if drifted and self.telemetry is not None:
            self.telemetry.inc("lagoon_agent_assumption_drift_total", drifted)
        if isinstance(self.model, RoutedModel) and gate.drift:  # a Router keeps the daily figure
            self.model.record_assumption_drift(drifted)

    # -- the loop -----------------------------------------------------------------------------
    def run(self, resume_calls: list[dict[str, Any]] | None = None, resume_step: int = 0) -> AgentExit:
        """Step until an AgentExit; record it as the `exit` event and return it.

        `resume_calls` are calls a crashed run had recorded but never started; they run first."""
        try:
            if resume_calls:
                self.run_calls(resume_step, resume_calls)
            while True:
                try:
                    self.step()
                except FormatError as exc:
                    self.emit("format_error", {"step": self.trajectory.steps, "error": exc.message})
                    if self.trajectory.format_errors_in_row >= self.limits.max_format_errors:
                        raise FormatError(
                            f"{self.trajectory.format_errors_in_row} malformed replies in a row "
                            f"(agent.max_format_errors={self.limits.max_format_errors}); last: {exc.message}"
                        ) from exc
        except AgentExit as exc:
            outcome = exc
        except LagoonError as exc:
            outcome = AgentExit(f"{type(exc).__name__}: {exc}")
            outcome.status = "model_error"
        self.emit("exit", {"status": outcome.status, "message": outcome.message})
        return outcome

    def check_limits(self) -> None:
        t, lim = self.trajectory, self.limits
        if t.steps >= lim.step_limit:
            raise LimitsExceeded(f"step limit reached ({t.steps} model calls; agent.step_limit={lim.step_limit})")
        if lim.cost_limit > 0 and t.cost_usd >= lim.cost_limit:
            raise LimitsExceeded(f"cost limit reached (${t.cost_usd:.4f}; agent.cost_limit={lim.cost_limit})")
        elapsed = time.monotonic() - self.started
        if elapsed >= lim.time_limit_s:
            raise LimitsExceeded(f"time limit reached ({elapsed:.0f} s; agent.time_limit_s={lim.time_limit_s:g})")

    def step(self) -> None:
        self.check_limits()
        t0 = time.perf_counter()
        checked = self.gate.version  # the version the drift was found in
        gate = self.gate.check()
        for d in gate.drift:
            self.emit("assumption", {**d.to_event(), "version": checked})
        self._record_drift(gate)
        for failure in gate.failures:
            self._count("lagoon_agent_validation_failures_total")
            self.emit("validation", {"ok": False, **failure})
        self.record_snapshots()  # recorded even when the new version fails too: it exists
        if gate.halt:
            raise ValidationHalt(
                f"context failed validation {self.gate.consecutive_failures} times in a row "
                f"(validation.max_consecutive_validation_failures={self.gate.max_failures}); last reasons: "
                + "; ".join(gate.failures[-1]["reasons"])
            )
        if isinstance(self.model, RoutedModel) and self.gate.manager is not None:  # a Router tracks pass rates
            for _ in gate.failures:
                self.model.record_validation(False)
            self.model.record_validation(True)
        if gate.failures:
            self.emit("validation", {"ok": True, "version": gate.version, "reasons": [], "consecutive": 0})
        if self.telemetry is not None:
            self.telemetry.set("lagoon_agent_context_version", gate.version)
        messages = self.memory.render(self.gate.context_texts())
        summarizing = 0.0  # model-written summaries are model time, not loop overhead
        for summary in self.memory.take_evictions():  # which summary each evicted turn got, and from where
            self._count("lagoon_agent_memory_summaries_total", {"source": summary.source})
            summarizing += summary.latency_s
            self.emit("memory", summary.to_event())
        if self.telemetry is not None:
            self.telemetry.observe("lagoon_agent_step_overhead_seconds", time.perf_counter() - t0 - summarizing)
        step = self.trajectory.steps + 1
        start = time.perf_counter()
        response = self.model.chat(messages, tools=self.tools.specs())
        latency = time.perf_counter() - start
        record = {
            "step": step,
            "message": message_to_dict(response.message),
            "usage": {"input_tokens": response.usage.input_tokens, "output_tokens": response.usage.output_tokens,
                      "cost_usd": response.usage.cost_usd},
            "backend": response.backend or response.model,
            "model": response.model,
            "latency_s": response.latency_s or latency,
            "route": response.route.to_dict() if response.route else None,
            "prompt_messages": len(messages),
        }
        try:
            calls, mode = parse_actions(response.message, step)
        except ReplyFormatError as exc:
            self.emit("model", {**record, "calls": [], "mode": "invalid"})
            raise FormatError(str(exc)) from None
        unknown = [c.name for c in calls if c.name not in self.tools.tools]
        call_dicts = [{"id": c.id, "name": c.name, "arguments": dict(c.arguments)} for c in calls]
        self.emit("model", {**record, "calls": [] if unknown else call_dicts, "mode": "invalid" if unknown else mode})
        self._count("lagoon_agent_steps_total")
        if unknown:
            raise FormatError(f"unknown tool {unknown[0]!r}; the tools are: {', '.join(self.tools.tools)}")
        self.run_calls(step, call_dicts)

    def run_calls(self, step: int, calls: list[dict[str, Any]]) -> None:
        """Run each call as intent → tool → result; raise Submitted after a successful submit."""
        submitted: str | None = None
        for call in calls:
            self.emit("tool_intent", {"step": step, "call_id": call["id"], "name": call["name"],
                                      "arguments": call["arguments"]})
            out = self.tools.run(call["name"], call["arguments"])
            self._count("lagoon_agent_tool_calls_total", {"tool": call["name"], "ok": str(out.ok).lower()})
            result = self.store.redactor.scrub({
                "step": step, "call_id": call["id"], "name": call["name"], "arguments": call["arguments"],
                "text": out.text, "ok": out.ok, "exit_code": out.exit_code, "files": list(out.files),
                "meta": dict(out.meta)})
            with self.store.batch():  # the result, its terminal record and the tool state: one commit
                if call["name"] == "bash":
                    self.store.record_command(self.session_id, step, str(call["arguments"].get("command", "")),
                                              out.exit_code, float(out.meta.get("duration_s", 0.0)), out.text)
                if self.persist_tool_state and call["name"] in ("bash", "edit"):
                    self.store.save_tool_state(self.session_id, self.tools.state())
                seq = self.store.append(self.session_id, "tool_result", result)
            self._apply("tool_result", result, seq)
            self.gate.observe(call["name"], call["arguments"], text=out.text, exit_code=out.exit_code,
                              files=out.files, edit=bool(out.meta.get("edit")))
            if out.submitted:
                submitted = out.text
        if submitted is not None:
            raise Submitted(submitted)
