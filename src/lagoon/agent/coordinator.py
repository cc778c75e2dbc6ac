"""`run_coordinated`: `agent.mode: coordinated` — a retriever, a coder and a verifier, typed hops.

    retriever ──RetrieverOutput──▶ coder ──CoderOutput──▶ verifier ──passed──▶ done
                                     ▲                        │
                                     └──── findings ──────────┘  (at most agent.coordinator_rounds)

Each hop is a whole agent run (`run_task`) in its own sub-session ``<sid>.<role>.<round>``, offered
the role's tools only, prompted with its input contract; what it submits is parsed into the role's
output contract (`lagoon.agent.contracts`; a breach ends the run with status
``contract_violation``). The coordinator's own session records the hops:

    task        {task, session_id, mode}
    hop         {role, round, version, input, session}         before the hop runs
    hop_result  {role, round, version, output, status, steps}  after it, validated
    context     {version, reasons}                              every validated hop bumps the version
    exit        {status, message}

and, per version, the contract that produced it in the session's snapshots table (so
`lagoon sessions export` shows contracts and versions hop by hop).

Resume (after kill -9 too): the coordinator runs its flow again from the start; a hop with a
recorded result returns it without running, and the hop that was in flight runs `run_task` with the
same sub-session id, which resumes that session — a tool call cut by the crash is reported to the
model, never re-run. `models(role, replies_so_far)` gives each role's model; a scripted model is
started after the replies its role's sub-sessions already hold.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jinja2
from pydantic import BaseModel

from lagoon.agent.contracts import ROLES, CoderInput, RetrieverInput, VerifierInput, parse_output
from lagoon.agent.runner import RunResult, model_replies, run_task, stored_result, trajectory_path
from lagoon.agent.session import SessionStore, session_id_for
from lagoon.atomic import write_json_atomic
from lagoon.config import LagoonConfig
from lagoon.errors import ConfigError, ContractError
from lagoon.protocols import ChatModel

__all__ = ["run_coordinated", "ROLE_TOOLS", "coordinated_session_id"]

ROLE_TOOLS: dict[str, tuple[str, ...]] = {
    "retriever": ("search", "view", "bash"),
    "coder": ("bash", "view", "edit", "search", "assume", "verify"),
    "verifier": ("bash", "view"),
}
DUTIES = {
    "retriever": "Find the files this task is about (search, view, read-only commands). Change nothing.",
    "coder": "Make the smallest correct change in the files you were given; address every finding.",
    "verifier": "Run the tests that cover the change and judge it. Change nothing. "
                "passed=false with findings (failing tests, tracebacks) sends the coder back.",
}
_PROMPTS = jinja2.Environment(loader=jinja2.PackageLoader("lagoon.agent", "prompts"),
                              undefined=jinja2.StrictUndefined, keep_trailing_newline=True)

Models = Callable[[str, int], ChatModel]


def coordinated_session_id(repo: str | Path, task: str) -> str:
    return session_id_for(repo, "coordinated\0" + task)


class _Stop(Exception):
    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class _Coordinator:
    def __init__(self, task: str, root: Path, config: LagoonConfig, store: SessionStore, sid: str,
                 models: Models, telemetry: Any, on_event: Any) -> None:
        self.task, self.root, self.store, self.sid = task, root, store, sid
        self.models, self.telemetry, self.on_event = models, telemetry, on_event
        self.config = config.model_copy(update={"agent": config.agent.model_copy(update={"mode": "single"})})
        self.rounds = config.agent.coordinator_rounds
        events = list(store.events(sid))
        self.fresh = not events
        self.done = {(e["payload"]["role"], e["payload"]["round"]): e["payload"]
                     for e in events if e["kind"] == "hop_result"}
        self.started = {(e["payload"]["role"], e["payload"]["round"]) for e in events if e["kind"] == "hop"}
        self.exit = next((e["payload"] for e in events if e["kind"] == "exit"), None)
        self.version = max([1, *(p["version"] for p in self.done.values())])
        self.results: list[RunResult] = []

    def emit(self, kind: str, payload: dict[str, Any]) -> None:
        seq = self.store.append(self.sid, kind, payload)
        if self.on_event is not None:
            self.on_event(kind, {**payload, "seq": seq})

    def _replies(self, role: str) -> int:
        return sum(model_replies(self.root, self.config, f"{self.sid}.{role}.{r}")
                   for r in range(1, self.rounds + 1) if (role, r) in self.started)

    def hop(self, role: str, round_: int, contract: BaseModel) -> Any:
        if (role, round_) in self.done:
            return ROLES[role][1].model_validate(self.done[(role, round_)]["output"])
        in_type = ROLES[role][0]
        contract = in_type.model_validate(contract.model_dump())  # the input side is validated too
        sub = f"{self.sid}.{role}.{round_}"
        if (role, round_) not in self.started:
            self.emit("hop", {"role": role, "round": round_, "version": self.version,
                              "input": contract.model_dump(), "session": sub})
        replies = self._replies(role)
        self.started.add((role, round_))
        prompt = _PROMPTS.get_template("role.j2").render(
            role=role, task=self.task, duty=DUTIES[role], input=contract.model_dump_json(indent=1),
            schema=json.dumps(ROLES[role][1].model_json_schema()["properties"]))
        result = run_task(prompt, self.root, self.config, model=self.models(role, replies), session_id=sub,
                          tools=ROLE_TOOLS[role], telemetry=self.telemetry, on_event=self.on_event)
        self.results.append(result)
        if not result.submitted:
            raise _Stop(result.exit_status, f"{role} (round {round_}): {result.exit_message}")
        try:
            out = parse_output(role, result.exit_message)
        except ContractError as exc:
            raise _Stop("contract_violation", str(exc)) from None
        self.version += 1
        reason = f"hop {role} round {round_}"
        self.store.record_snapshot(self.sid, self.version, {"reason": reason, "role": role, "round": round_,
                                                            "input": contract.model_dump(),
                                                            "output": out.model_dump(), "session": sub})
        self.emit("hop_result", {"role": role, "round": round_, "version": self.version, "output": out.model_dump(),
                                 "status": result.exit_status, "steps": result.steps, "session": sub})
        self.emit("context", {"version": self.version, "reasons": [reason]})
        self.done[(role, round_)] = {"output": out.model_dump()}
        return out

    def run(self) -> tuple[str, str]:
        if self.fresh:
            self.emit("task", {"task": self.task, "session_id": self.sid, "mode": "coordinated"})
            self.store.record_snapshot(self.sid, 1, {"reason": "initial", "task": self.task})
            self.emit("context", {"version": 1, "reasons": ["initial"]})
        found = self.hop("retriever", 1, RetrieverInput(task=self.task, version=self.version))
        findings: list[str] = []
        for round_ in range(1, self.rounds + 1):
            code = self.hop("coder", round_, CoderInput(task=self.task, files=found.files, notes=found.notes,
                                                        findings=findings, round=round_, version=self.version))
            verdict = self.hop("verifier", round_, VerifierInput(task=self.task, summary=code.summary,
                                                                 files_changed=code.files_changed,
                                                                 version=self.version))
            if verdict.passed:
                return "submitted", f"submitted: {code.summary} (verified: {verdict.test_command or 'by the verifier'})"
            findings = verdict.findings
        raise _Stop("verification_failed", f"the verifier rejected {self.rounds} rounds "
                                           f"(agent.coordinator_rounds={self.rounds}); last findings: "
                                           + "; ".join(findings))


def run_coordinated(instruction: str, workspace: Path, config: LagoonConfig, *, models: Models,
                    session_id: str | None = None, telemetry: Any = None, on_event: Any = None) -> RunResult:
    """Run (or resume) `instruction` with the coordinated roles; a `RunResult` over all hops."""
    started = time.perf_counter()
    if not instruction.strip():
        raise ConfigError("the task is empty; say what the agent should do")
    root = Path(workspace).resolve()
    store = SessionStore.for_workspace(root, config.agent.state_dir)
    sid = session_id or coordinated_session_id(root, instruction)
    path = trajectory_path(root, config, sid)
    try:
        resumed = store.open(sid, str(root), instruction, meta={"mode": "coordinated"})
        c = _Coordinator(instruction, root, config, store, sid, models, telemetry, on_event)
        if c.exit is not None:
            status, message = c.exit["status"], c.exit["message"]
        else:
            try:
                status, message = c.run()
            except _Stop as stop:
                status, message = stop.status, stop.message
            c.emit("exit", {"status": status, "message": message})
            store.set_status(sid, status)
        subs = _sub_results(root, config, sid, store)
        return RunResult(
            session_id=sid, exit_status=status, exit_message=message, submitted=status == "submitted",
            model_used=",".join(sorted({r.model_used for r in subs if r.model_used})),
            latency_ms=(time.perf_counter() - started) * 1000.0,
            validation_passed=all(r.validation_passed for r in subs),
            steps=sum(r.steps for r in subs), input_tokens=sum(r.input_tokens for r in subs),
            output_tokens=sum(r.output_tokens for r in subs), cost_usd=sum(r.cost_usd for r in subs),
            commands=[cmd for r in subs for cmd in r.commands],
            validation_failures=sum(r.validation_failures for r in subs),
            assumption_drift=sum(r.assumption_drift for r in subs),
            context_version=max(store.snapshot_versions(sid) or [0]),
            interrupted_steps=[s for r in subs for s in r.interrupted_steps],
            resumed=resumed, trajectory=str(path))
    finally:
        try:
            doc = store.export(sid)
            doc["hops"] = [e["payload"] for e in doc["events"] if e["kind"] == "hop_result"]
            write_json_atomic(path, doc, indent=1, ensure_ascii=False)
        finally:
            store.close()


def _sub_results(root: Path, config: LagoonConfig, sid: str, store: SessionStore) -> list[RunResult]:
    """Every hop's stored result, from its sub-session's events."""
    return [stored_result(store, s["id"], root, config) for s in store.list() if s["id"].startswith(sid + ".")]
