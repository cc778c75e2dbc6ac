"""The coding agent: a small loop over injected parts, with sessions that survive crashes.

    run_task(instruction, workspace, config, *, model=None, environment=None, session_id=None,
             telemetry=None) -> RunResult

Layout: `loop.py` (the Agent and its exits), `runner.py` (wiring, resume, RunResult),
`session.py` (SQLite store), `trajectory.py` (what events add up to), `memory.py` (prompt under
budget), `summarizer.py` (model-written long-term summaries), `token_counter.py` (prompt counts
without re-tokenizing), `context_gate.py` (never act on stale context), `environment.py` (commands),
`workspace.py` (path confinement), `redaction.py` (secrets), `parser.py` (text fallback),
`tools/` (bash, view, edit, search, submit).

Imports no torch: the model comes from `lagoon.routing.build_router`, imported lazily.
"""

from lagoon.agent.context_gate import ContextGate, SnapshotManager
from lagoon.agent.environment import LocalEnvironment
from lagoon.agent.loop import Agent, FormatError, LimitsExceeded, Submitted, ValidationHalt
from lagoon.agent.memory import Memory
from lagoon.agent.runner import RunResult, build_model, run_task, trajectory_path
from lagoon.agent.session import SessionStore, session_id_for
from lagoon.agent.summarizer import ModelSummarizer, Summary
from lagoon.agent.token_counter import TokenCounter
from lagoon.agent.workspace import Workspace

__all__ = [
    "run_task",
    "RunResult",
    "build_model",
    "trajectory_path",
    "Agent",
    "Submitted",
    "LimitsExceeded",
    "FormatError",
    "ValidationHalt",
    "ContextGate",
    "SnapshotManager",
    "LocalEnvironment",
    "Memory",
    "ModelSummarizer",
    "Summary",
    "TokenCounter",
    "SessionStore",
    "session_id_for",
    "Workspace",
]
