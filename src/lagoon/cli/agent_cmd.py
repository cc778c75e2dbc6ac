"""`lagoon run TASK --repo R` and `lagoon sessions list|show|resume|export`.

Thin: parse, merge config, pick the model by spec, call `lagoon.agent.run_task`, show progress.
Model specs (`--model`): see `lagoon.cli.model_spec`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from lagoon.atomic import write_atomic
from lagoon.cli.common import ConfigOpt, exits_cleanly, load
from lagoon.cli.live_view import LiveView
from lagoon.cli.model_spec import ModelSpec

sessions_app = typer.Typer(help="Inspect, resume and export agent sessions.", no_args_is_help=True)

RepoOpt = Annotated[Path, typer.Option("--repo", "-r", help="The repository (workspace) folder.")]
ModelOpt = Annotated[
    str, typer.Option("--model", "-m", help="router (default: the configured backends) or scripted:FILE.")
]


def _summary(console: Console, result: Any) -> None:
    table = Table(title="summary", show_header=False)
    d = result.to_dict()
    for key in ("session_id", "exit_status", "exit_message", "model_used", "steps", "input_tokens", "output_tokens",
                "cost_usd", "validation_passed", "validation_failures", "context_version", "latency_ms", "trajectory"):
        value = d[key]
        table.add_row(key, f"{value:.1f}" if isinstance(value, float) else str(value))
    table.add_row("commands", str(len(d["commands"])))
    if d.get("summaries"):
        table.add_row("memory summaries", ", ".join(f"{k} {v}" for k, v in sorted(d["summaries"].items())))
    table.add_row("resumed", str(d["resumed"]))
    console.print(table)


@contextlib.contextmanager
def _terminate_cleanly() -> Iterator[None]:
    """SIGTERM (a timeout, `kill`) unwinds like Ctrl-C instead of killing the interpreter outright,
    so `run_task`'s `finally` still kills the command's process group, saves the trajectory and
    removes the environment's temp folder."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _execute(task: str, repo: Path, config: Any, model_spec: str, session: str | None, as_json: bool) -> None:
    from lagoon.agent import run_task
    from lagoon.agent.runner import model_replies
    from lagoon.agent.session import session_id_for
    from lagoon.telemetry import Telemetry

    spec = ModelSpec.parse(model_spec)
    coordinated = config.agent.mode == "coordinated"
    if coordinated:
        from lagoon.agent.coordinator import run_coordinated

        role_models = spec.role_models(config)
    else:
        done = 0
        if spec.kind == "scripted" and repo.is_dir():  # a script continues a resumed session where it stopped
            done = model_replies(repo, config, session or session_id_for(repo.resolve(), task))
        model = spec.model(config, replies_so_far=done)
    telemetry = Telemetry(config.telemetry)
    console = Console()
    if as_json:
        with _terminate_cleanly():
            if coordinated:
                result = run_coordinated(task, repo, config, models=role_models, session_id=session,
                                         telemetry=telemetry)
            else:
                result = run_task(task, repo, config, model=model, session_id=session, telemetry=telemetry)
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        view = LiveView(console)
        with _terminate_cleanly(), view.live:
            if coordinated:
                result = run_coordinated(task, repo, config, models=role_models, session_id=session,
                                         telemetry=telemetry, on_event=view)
            else:
                result = run_task(task, repo, config, model=model, session_id=session, telemetry=telemetry,
                                  on_event=view)
        _summary(console, result)
    if not result.submitted:
        raise typer.Exit(1)


@exits_cleanly
def run(
    task: Annotated[str, typer.Argument(help="What the agent should do, e.g. 'fix the failing test'.")],
    repo: RepoOpt = Path("."),
    config: ConfigOpt = None,
    session: Annotated[str | None, typer.Option("--session", help="Session id (default: from repo + task).")] = None,
    max_steps: Annotated[int | None, typer.Option("--max-steps", help="Override agent.step_limit.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the RunResult as JSON, no live view.")] = False,
    model: ModelOpt = "router",
) -> None:
    """Run the coding agent on TASK in --repo (resuming the session if it exists); exit 0 when submitted."""
    layers = list(config or [])
    if max_steps is not None:
        layers.append(f"agent.step_limit={max_steps}")
    _execute(task, repo, load(layers), model, session, as_json)


def _store(repo: Path, config: Any) -> Any:
    from lagoon.agent.session import DB_NAME, SessionStore
    from lagoon.errors import SessionError

    path = repo.resolve() / config.agent.state_dir / DB_NAME
    if not path.exists():
        raise SessionError(f"no sessions in {repo} (no {path}); run `lagoon run TASK --repo {repo}` first")
    return SessionStore(path)


@sessions_app.command("list")
@exits_cleanly
def list_(repo: RepoOpt = Path("."), config: ConfigOpt = None) -> None:
    """List the sessions of a workspace, newest first."""
    store = _store(repo, load(config))
    table = Table()
    for col in ("id", "status", "events", "task"):
        table.add_column(col)
    for s in store.list():
        table.add_row(s["id"], s["status"], str(s["events"]), s["task"][:70])
    Console().print(table)


@sessions_app.command()
@exits_cleanly
def show(session_id: str, repo: RepoOpt = Path("."), config: ConfigOpt = None) -> None:
    """Show one session: its record and its events, one line each."""
    store = _store(repo, load(config))
    info = store.get(session_id)
    console = Console()
    console.print({k: v for k, v in info.items() if k != "meta"})
    for e in store.events(session_id):
        p = e["payload"]
        brief = p.get("name") or p.get("status") or p.get("error") or p.get("version") or ""
        console.print(f"{e['seq']:>4}  {e['kind']:<17} {str(brief)[:90]}", markup=False, highlight=False)


@sessions_app.command()
@exits_cleanly
def resume(
    session_id: str,
    repo: RepoOpt = Path("."),
    config: ConfigOpt = None,
    model: ModelOpt = "router",
    as_json: Annotated[bool, typer.Option("--json", help="Print the RunResult as JSON.")] = False,
) -> None:
    """Resume a session where it stopped (a crashed command is reported, not re-run); a coordinated
    session resumes coordinated (its mode is recorded with it)."""
    cfg = load(config)
    store = _store(repo, cfg)
    info = store.get(session_id)
    store.close()
    if info["meta"].get("mode") == "coordinated":
        cfg = cfg.model_copy(update={"agent": cfg.agent.model_copy(update={"mode": "coordinated"})})
    _execute(info["task"], repo, cfg, model, session_id, as_json)


@sessions_app.command()
@exits_cleanly
def export(
    session_id: str,
    repo: RepoOpt = Path("."),
    config: ConfigOpt = None,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
) -> None:
    """Print the JSON trajectory (format_version, every event in order with its seq)."""
    store = _store(repo, load(config))
    text = json.dumps(store.export(session_id), indent=2, ensure_ascii=False)
    if output is None:
        typer.echo(text)
    else:
        write_atomic(output, text)
