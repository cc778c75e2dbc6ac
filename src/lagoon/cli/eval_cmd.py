"""`lagoon eval [SUITE...] --agent {lagoon,oracle,none}`: run a suite, write results, summary and report.

Thin: merge the config, call `lagoon.eval.run_suite` per suite, summarise, write the report and print
the headline. With no SUITE the config's ``model_deployment.evaluation.benchmarks`` are run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lagoon.cli.common import ConfigOpt, err_console, exits_cleanly, load

__all__ = ["eval_command"]


@exits_cleanly
def eval_command(
    suites: Annotated[list[str] | None, typer.Argument(help="Suite folders or names; default: evaluation.benchmarks.")] = None,
    agent: Annotated[str, typer.Option("--agent", "-a", help="lagoon (the agent), oracle (reference solutions) or none.")] = "lagoon",
    workers: Annotated[int | None, typer.Option("--workers", "-w", min=1, help="Tasks in parallel (default eval.workers).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Output folder (default runs/eval/SUITE-AGENT); reused to resume.")] = None,
    executor: Annotated[str | None, typer.Option("--executor", help="local (process pool) or ray (default eval.executor).")] = None,
    created_after: Annotated[str | None, typer.Option("--created-after", help="Only tasks created on/after YYYY-MM-DD.")] = None,
    attempts: Annotated[int, typer.Option("--attempts", "-k", min=1, help="Trials per task (pass@k).")] = 1,
    model: Annotated[str | None, typer.Option("--model", "-m", help="router (default), scripted:DIR (one TASK_ID.json script per task) or scripted:FILE, for --agent lagoon.")] = None,
    fidelity: Annotated[Path | None, typer.Option("--fidelity", help="JSON of the quantized model's fidelity numbers to include.")] = None,
    task: Annotated[list[str] | None, typer.Option("--task", "-t", help="Run only these task ids (repeatable).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Run an agent over task suites; write results.jsonl, summary.json and report.html."""
    from lagoon.cli.model_spec import ModelSpec
    from lagoon.errors import ConfigError
    from lagoon.eval import run_suite, summarize, write_report

    cfg = load(config)
    from lagoon.eval.sandbox import bwrap_available

    if cfg.eval.sandbox == "none" or (cfg.eval.sandbox == "auto" and not bwrap_available()):
        err_console.print(
            "[yellow]warning[/yellow]: no bubblewrap sandbox (eval.sandbox="
            f"{cfg.eval.sandbox}); tasks run in a temporary folder with TEST_DIR set, with the network "
            "and the host writable, and tasks that hard-code /app or /logs cannot pass. "
            "Install bubblewrap (apt-get install bubblewrap) for the real sandbox.",
            markup=True, highlight=False,
        )
    names = suites or list(cfg.model_deployment.evaluation.benchmarks)
    if not names:
        raise ConfigError("no suite given and evaluation.benchmarks is empty; pass a suite folder")
    factory = ModelSpec.parse(model).factory() if model is not None else None
    fid = None
    if fidelity is not None:
        try:
            fid = json.loads(fidelity.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--fidelity {fidelity}: cannot read a JSON object ({exc})") from exc
    idle: list[str] = []
    for name in names:
        dest = out if out is not None and len(names) == 1 else (out or Path("runs/eval")) / f"{Path(name).name}-{agent}"
        outcome = run_suite(
            name, agent, cfg, dest, workers=workers, executor=executor, created_after=created_after,
            attempts=attempts, model_factory=factory, only=task, progress=True,
        )
        for err in outcome.spec_errors:
            err_console.print(f"[yellow]spec error[/yellow] {err}", markup=True, highlight=False)
        summary = summarize(outcome.results, fidelity=fid)
        summary["suite"] = str(name)
        summary["spec_errors"] = outcome.spec_errors
        summary["dropped_by_created_after"] = outcome.dropped
        summary_path, report_path = write_report(dest, outcome.results, summary, title=f"Lagoon eval: {name} ({agent})")
        _print(summary, outcome.resumed, report_path)
        if not any(_ran(r) for r in outcome.results):
            idle.append(f"{name} ({_why_idle(outcome)})")
    if idle:  # a run where nothing ran is not a pass rate of "—": scripts and CI must see it fail
        typer.echo(f"error: no task could run in {'; '.join(idle)}; fix the suite or the sandbox "
                   "(the report lists each task's reason)", err=True)
        raise typer.Exit(2)


def _ran(row: Any) -> bool:
    """A trial (`TrialResult`) that reached its agent and tests (passed, failed or an agent error)."""
    return row.status != "environment_unsupported" and row.failure_mode != "setup_error"


def _why_idle(outcome: Any) -> str:
    rows = outcome.results
    parts = [f"{len(outcome.spec_errors)} spec errors"] if outcome.spec_errors else []
    unsupported = sum(r.status == "environment_unsupported" for r in rows)
    setup = sum(r.failure_mode == "setup_error" for r in rows)
    if unsupported:
        parts.append(f"{unsupported} environment unsupported")
    if setup:
        parts.append(f"{setup} setup errors")
    if outcome.dropped:
        parts.append(f"{len(outcome.dropped)} left out by created_after")
    return ", ".join(parts) or "no tasks selected"


def _print(summary: dict, resumed: int, report: Path) -> None:
    table = Table(show_header=False)
    ci = summary["pass_rate_ci95"]
    rate = summary["pass_rate"]
    table.add_row("suite", str(summary.get("suite")))
    table.add_row("tasks", f"{summary['tasks']} ({summary['trials']} trials, {resumed} resumed)")
    table.add_row("pass rate", "—" if rate is None else f"{rate:.1%}  (95% CI {ci[0]:.1%}–{ci[1]:.1%})")
    table.add_row("environment unsupported", ", ".join(summary["environment_unsupported"]) or "none")
    table.add_row("spec errors", str(len(summary.get("spec_errors") or [])))
    table.add_row("command success", "—" if summary["command_success_rate"] is None else f"{summary['command_success_rate']:.1%}")
    table.add_row("report", str(report))
    Console().print(table)
