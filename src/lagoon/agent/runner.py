"""`run_task`: one task in one workspace, start to finish (or resumed), and its `RunResult`.

Builds what the loop needs — workspace, session store, environment, tools, memory, context gate,
model — resumes the session if it exists, runs the `Agent`, and always saves the JSON trajectory
(`<workspace>/<state_dir>/trajectories/<session_id>.json`) in `finally`, where it also closes what
it built (the `LocalEnvironment` and its temp folder, the snapshot manager, the session store) on
every exit path: normal, error or Ctrl-C.

Resume rules: events are replayed into a fresh `Trajectory` and `Memory`; a tool call that has an
intent but no result is recorded as `tool_interrupted` and reported to the model, never re-run;
calls recorded but never started run first. Tool state (cwd, env, undo history) is restored only
when `agent.persist_tool_state` is on. A session that already has an `exit` event is not
run again: its stored result is returned. `model_replies` says how many replies a session already
holds (model steps plus model-written memory summaries), for a caller that builds a scripted model
to continue it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import jinja2

from lagoon.agent.assumptions import AssumptionBook
from lagoon.agent.context_gate import ContextGate, SnapshotManager, context_file_hash
from lagoon.agent.environment import LocalEnvironment
from lagoon.agent.loop import Agent, AgentExit
from lagoon.agent.memory import Memory
from lagoon.agent.redaction import Redactor
from lagoon.agent.session import DB_NAME, FORMAT_VERSION, SessionLocks, SessionStore, session_id_for
from lagoon.agent.summarizer import ModelSummarizer
from lagoon.agent.tools import ToolBox
from lagoon.agent.tools.assume import AssumeTool
from lagoon.agent.tools.bash import BashTool
from lagoon.agent.tools.edit import EditTool
from lagoon.agent.tools.search import SearchTool
from lagoon.agent.tools.submit import SubmitTool
from lagoon.agent.tools.verify import VerifyTool
from lagoon.agent.tools.view import ViewTool
from lagoon.agent.trajectory import Trajectory
from lagoon.agent.workspace import Workspace
from lagoon.atomic import write_json_atomic
from lagoon.config import LagoonConfig
from lagoon.errors import ConfigError
from lagoon.protocols import ChatMessage, ChatModel, Environment, Retriever, RoutedModel

__all__ = ["run_task", "RunResult", "trajectory_path", "build_model", "stored_result"]

_PROMPTS = jinja2.Environment(
    loader=jinja2.PackageLoader("lagoon.agent", "prompts"),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


@dataclass
class RunResult:
    """How a run ended and what it cost. `to_dict()` is the JSON form (with `format_version`)."""

    session_id: str
    exit_status: str
    exit_message: str
    submitted: bool
    model_used: str
    latency_ms: float
    validation_passed: bool
    steps: int
    input_tokens: int
    output_tokens: int
    cost_usd: float
    commands: list[dict[str, Any]] = field(default_factory=list)
    validation_failures: int = 0
    assumption_drift: int = 0
    backends: dict[str, int] = field(default_factory=dict)
    context_version: int = 0
    interrupted_steps: list[dict[str, Any]] = field(default_factory=list)
    summaries: dict[str, int] = field(default_factory=dict)
    resumed: bool = False
    trajectory: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def success(self) -> bool:
        return self.submitted

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "success": self.success}


def model_replies(workspace: Path, config: LagoonConfig, session_id: str) -> int:
    """How many model replies (steps and model-written summaries) session `session_id` holds; 0 for
    a session that does not exist yet."""
    root = Path(workspace).resolve()
    if not (root / config.agent.state_dir / DB_NAME).exists():
        return 0
    store = SessionStore.for_workspace(root, config.agent.state_dir)
    try:
        traj = Trajectory()
        for e in store.events(session_id):
            traj.apply(e["kind"], e["payload"])
    finally:
        store.close()
    return traj.steps + traj.summary_calls


def trajectory_path(workspace: Path, config: LagoonConfig, session_id: str) -> Path:
    return Path(workspace).resolve() / config.agent.state_dir / "trajectories" / f"{session_id}.json"


def build_model(config: LagoonConfig, telemetry: Any = None) -> ChatModel:
    """The router over the configured backends (imported lazily: routing pulls in the provider SDKs)."""
    from lagoon.routing import build_router

    return build_router(config, telemetry)


def _context_parts(root: Path, config: LagoonConfig, model: ChatModel) -> tuple[Any, Any]:
    """The context package's retriever (counting in the model's tokens) and snapshot manager."""
    from lagoon.context import CodeRetriever, ContextManager

    def count(text: str) -> int:
        return model.count_tokens([ChatMessage(role="user", content=text)])

    state = config.agent.state_dir
    return (CodeRetriever(root, config.context, token_counter=count, state_dir=state),
            ContextManager(root, config.context, config.validation, state_dir=state))


def fresh_for_s(config: LagoonConfig) -> float:
    """How long a validated snapshot stays fresh (`context.staleness_threshold_ms`, when
    `validation.require_fresh_context`)."""
    if not config.validation.require_fresh_context:
        return float("inf")
    return config.context.staleness_threshold_ms / 1000.0


def _save_trajectory(store: SessionStore, session_id: str, path: Path) -> None:
    write_json_atomic(path, store.export(session_id), indent=1, ensure_ascii=False)


def run_task(
    instruction: str,
    workspace: Path,
    config: LagoonConfig,
    *,
    model: ChatModel | None = None,
    environment: Environment | None = None,
    session_id: str | None = None,
    telemetry: Any = None,
    retriever: Retriever | None = None,
    snapshot_manager: SnapshotManager | None = None,
    on_event: Any = None,
    tools: Sequence[str] | None = None,
) -> RunResult:
    """Run (or resume) `instruction` in `workspace` and return how it ended. `tools` limits the
    tools offered to those names (`submit` always stays): a coordinated role's toolset, narrowed
    further by `agent.tools`."""
    started = time.perf_counter()
    if not instruction.strip():
        raise ConfigError("the task is empty; say what the agent should do")
    ws = Workspace(workspace, config.agent.state_dir)
    redactor = Redactor()
    store = SessionStore.for_workspace(ws.root, config.agent.state_dir, redactor=redactor)
    sid = session_id or session_id_for(ws.root, instruction)
    traj_file = trajectory_path(ws.root, config, sid)
    owned: list[Any] = []  # things built here that hold files open
    try:
        resumed = store.open(sid, str(ws.root), instruction)
        events = list(store.events(sid))
        finished = next((e for e in events if e["kind"] == "exit"), None)
        if finished is not None:
            traj = Trajectory()
            for e in events:
                traj.apply(e["kind"], e["payload"])
            return _result(sid, traj, started, resumed=True, path=traj_file)
        model = model if model is not None else build_model(config, telemetry)
        cap = config.agent.max_output_chars
        env = environment
        if env is None:  # ours: its private temp folder must go on every exit path
            env = LocalEnvironment(ws.root, timeout_s=config.agent.command_timeout_s,
                                   max_output_chars=cap - BashTool.FOOTER_ROOM, redactor=redactor)
            owned.append(env)
        if retriever is None and snapshot_manager is None:
            retriever, snapshot_manager = _context_parts(ws.root, config, model)
            owned.append(snapshot_manager)
        file_hash = context_file_hash(ws.root, config.context, config.agent.state_dir)
        book = AssumptionBook(ws.root, environment=env, file_hash=file_hash,
                              timeout_s=config.agent.command_timeout_s)
        max_assumptions = config.context.max_assumptions_per_snapshot
        offered: list[Any] = [BashTool(env, timeout_s=config.agent.command_timeout_s), ViewTool(ws, max_chars=cap),
                              EditTool(ws, SessionLocks(store, sid))]
        if retriever is not None:
            offered.append(SearchTool(retriever, budget_tokens=config.context.token_budget))
        # the contract tools come last: a small model leans towards the tools listed just before submit
        offered += [SubmitTool(), AssumeTool(book, max_assumptions=max_assumptions), VerifyTool(book)]
        allowed = {t.name for t in offered} if config.agent.tools is None else set(config.agent.tools)
        if tools is not None:
            allowed &= set(tools)
        offered = [t for t in offered if t.name in allowed or t.name == "submit"]
        toolbox = ToolBox(offered, max_chars=cap,
                          offered=lambda name: name != "verify" or bool(book.declared))
        mem_cfg = config.model_deployment.memory
        window = getattr(model, "context_window", 0) or mem_cfg.context_budget
        system = _PROMPTS.get_template("system.j2").render(
            repo=ws.root.name, tools=list(toolbox.tools), state_dir=config.agent.state_dir,
        )
        summarizer = (ModelSummarizer(model, max_tokens=config.agent.summary_max_tokens,
                                      timeout_s=config.agent.summary_timeout_s)
                      if config.agent.summaries == "model" else None)
        memory = Memory(model.count_tokens, budget=min(mem_cfg.context_budget, window),
                        strategy=mem_cfg.truncation_strategy, system=system, task=instruction,
                        summarizer=summarizer)
        traj = Trajectory(memory=memory)
        for e in events:
            traj.apply(e["kind"], e["payload"])
        persist = config.agent.persist_tool_state
        if persist and resumed:
            state = store.load_tool_state(sid)
            if state:
                toolbox.restore(state)
        gate = ContextGate(instruction, task_id=sid, retriever=retriever, manager=snapshot_manager,
                           max_failures=config.validation.max_consecutive_validation_failures,
                           k=config.context.top_k, budget_tokens=config.context.token_budget,
                           root=ws.root, file_hash=file_hash, fresh_for_s=fresh_for_s(config),
                           assumptions=book, max_assumptions=max_assumptions,
                           reject_unverified=config.validation.reject_unverified_assumptions,
                           chunk_ttl_s=config.context.chunk_ttl_s)
        _replay_observations(gate, book, events)
        agent = Agent(model, toolbox, memory, gate, store, sid, config.agent, trajectory=traj,
                      persist_tool_state=persist, telemetry=telemetry, on_event=on_event)
        if not events:
            agent.emit("task", {"task": instruction, "session_id": sid, "repo": str(ws.root)})
        gate.start(traj.context_version, reason="resumed" if events else "initial")
        agent.record_snapshots()
        if isinstance(model, RoutedModel):  # a Router classifies the task once
            context_text = "\n".join(gate.context_texts())
            # context_size is in characters, as classification.context_size_threshold is (seed 001).
            model.set_task(instruction, len(context_text))
        interrupted, unstarted = traj.pending()
        step = traj.open_step or 0
        for call in interrupted:
            agent.emit("tool_interrupted", {"step": step, "call_id": call["id"], "name": call["name"],
                                            "arguments": call["arguments"]})
        status = "crashed"
        try:
            outcome: AgentExit = agent.run(unstarted, step)
            status = outcome.status
        finally:
            store.set_status(sid, status)
            store.release_locks(sid)
        return _result(sid, traj, started, resumed=resumed, path=traj_file)
    finally:
        # every close runs even when an earlier one (or the trajectory write) raises, and on
        # KeyboardInterrupt: no lagoon-env-* folder, open index or database survives a run
        with contextlib.ExitStack() as closing:
            for thing in owned:
                close = getattr(thing, "close", None)
                if callable(close):
                    closing.callback(close)
            closing.callback(store.close)
            _save_trajectory(store, sid, traj_file)


def _replay_observations(gate: ContextGate, book: AssumptionBook, events: list[dict[str, Any]]) -> None:
    """A resumed run learns again what the crashed one had: evidence from every tool result, and the
    assumptions the model declared (re-checked now)."""
    for e in events:
        if e["kind"] != "tool_result":
            continue
        p = e["payload"]
        gate.observe(p["name"], p["arguments"], text=p["text"], exit_code=p.get("exit_code"),
                     files=p.get("files") or (), edit=bool((p.get("meta") or {}).get("edit")))
        declared = (p.get("meta") or {}).get("assumption")  # absent when the call was refused
        if p["name"] == "assume" and declared:
            book.declare(declared["name"], declared["claim"], declared["check"], declared["kind"],
                         declared["watch"])


def stored_result(store: SessionStore, session_id: str, workspace: Path, config: LagoonConfig) -> RunResult:
    """The `RunResult` a session's recorded events add up to (nothing is run)."""
    traj = Trajectory()
    for e in store.events(session_id):
        traj.apply(e["kind"], e["payload"])
    return _result(session_id, traj, time.perf_counter(), resumed=False,
                   path=trajectory_path(workspace, config, session_id))


def _result(sid: str, traj: Trajectory, started: float, *, resumed: bool, path: Path) -> RunResult:
    exit_ = traj.exit or {"status": "crashed", "message": ""}
    return RunResult(
        session_id=sid,
        exit_status=exit_["status"],
        exit_message=exit_["message"],
        submitted=exit_["status"] == "submitted",
        model_used=traj.models.most_common(1)[0][0] if traj.models else "",
        latency_ms=(time.perf_counter() - started) * 1000.0,
        validation_passed=traj.last_validation_ok and exit_["status"] != "validation_halt",
        steps=traj.steps,
        input_tokens=traj.input_tokens,
        output_tokens=traj.output_tokens,
        cost_usd=traj.cost_usd,
        commands=list(traj.commands),
        validation_failures=traj.validation_failures,
        assumption_drift=traj.assumption_drift,
        backends=dict(traj.backends),
        context_version=traj.context_version,
        interrupted_steps=list(traj.interrupted),
        summaries=dict(traj.summaries),
        resumed=resumed,
        trajectory=str(path),
    )
