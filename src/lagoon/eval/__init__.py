"""The evaluation harness: run an agent over task suites without Docker and score it by the tasks'
own tests.

    lagoon eval SUITE --agent {lagoon,oracle,none}

    tasks.py    Terminal-Bench 1 / 2 (Harbor) folders and SWE-bench JSONL → Task (spec errors collected)
    sandbox.py  Dockerfile → workspace; bubblewrap sandbox (Environment) with /app, /tests, /logs
    trial.py    one task, one agent, the task's tests → result dict
    runner.py   select (created-after), resume, executors (local pool | Ray), held-out split
    metrics.py  pass rate + Wilson CI, pass@k, steps, command success, tokens, cost, latency, routing
    report.py   summary.json + self-contained report.html with plots

Imports no torch; the `lagoon` agent is imported only when it is asked for.
"""

from lagoon.eval.metrics import SUMMARY_FORMAT_VERSION, pass_at_k, summarize, wilson_interval
from lagoon.eval.report import render_html, write_report
from lagoon.eval.result import RESULT_FORMAT_VERSION, TrialResult
from lagoon.eval.runner import (
    EXECUTORS,
    RunOutcome,
    read_results,
    resolve_suite,
    run_suite,
    split_for_fitting,
)
from lagoon.eval.sandbox import (
    EnvironmentUnsupported,
    Sandbox,
    build_environment,
    bwrap_available,
    parse_dockerfile,
)
from lagoon.eval.tasks import Suite, SweInstance, Task, load_suite
from lagoon.eval.trial import AGENTS, is_held_out, run_trial

__all__ = [
    "Task",
    "SweInstance",
    "Suite",
    "load_suite",
    "Sandbox",
    "EnvironmentUnsupported",
    "parse_dockerfile",
    "build_environment",
    "bwrap_available",
    "run_trial",
    "AGENTS",
    "RESULT_FORMAT_VERSION",
    "TrialResult",
    "is_held_out",
    "run_suite",
    "RunOutcome",
    "EXECUTORS",
    "read_results",
    "resolve_suite",
    "split_for_fitting",
    "summarize",
    "wilson_interval",
    "pass_at_k",
    "SUMMARY_FORMAT_VERSION",
    "write_report",
    "render_html",
]
