"""Run a suite: pick tasks, fan trials out to an executor, append each result as it lands.

`run_suite(suite, agent, config, out_dir)` loads the suite (spec errors are collected, the rest
runs), drops tasks created before ``--created-after`` / ``eval.created_after``, skips trials already
in ``out_dir/results.jsonl`` (so an interrupted run resumes where it stopped), and runs the rest on
an executor picked by name from `EXECUTORS`: ``local`` (in-process for one worker, else a process
pool) or ``ray`` (the optional extra; tasks become Ray remote calls, so a suite of thousands runs on
a cluster). Each finished trial is appended to ``results.jsonl`` in one write and fsynced.

`split_for_fitting` is the one place that says which tasks or results may feed router fitting or
calibration: held-out ones (``evaluation.holdout_repos``, and with ``evaluation.temporal_split`` the
tasks created on or after the split date) never do.

This module schedules; it does not score (`trial.py`) or summarise (`metrics.py`, `report.py`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from lagoon.atomic import write_atomic
from lagoon.config import LagoonConfig
from lagoon.errors import ConfigError, TaskSpecError
from lagoon.eval.result import TrialResult
from lagoon.eval.tasks import Task, load_suite, parse_date
from lagoon.eval.trial import AGENTS, ModelFactory, is_held_out, run_trial
from lagoon.extras import require
from lagoon.jsonl import JsonlRead, read_jsonl
from lagoon.registry import Registry

__all__ = [
    "run_suite",
    "RunOutcome",
    "EXECUTORS",
    "make_executor",
    "select_tasks",
    "split_for_fitting",
    "read_results",
    "resolve_suite",
]

Job = tuple[Task, str, LagoonConfig, int, ModelFactory | None]


def _work(job: Job) -> TrialResult:
    task, agent, config, attempt, factory = job
    return run_trial(task, agent, config, attempt=attempt, model_factory=factory)


class LocalExecutor:
    """Trials in this process (workers = 1) or a spawn-context process pool."""

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers

    def map_unordered(self, fn: Callable[[Job], TrialResult], jobs: Sequence[Job]) -> Iterator[TrialResult]:
        if self.workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job)
            return
        with ProcessPoolExecutor(max_workers=self.workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(fn, job) for job in jobs]
            for fut in as_completed(futures):
                yield fut.result()


class RayExecutor:
    """Trials as Ray tasks: joins the cluster in RAY_ADDRESS, or starts a local one."""

    def __init__(self, workers: int = 1) -> None:
        ray = require("ray", "eval.executor=ray (or use --executor local)")
        self.ray = ray
        if not ray.is_initialized():
            ray.init(
                address=os.environ.get("RAY_ADDRESS"),
                num_cpus=None if os.environ.get("RAY_ADDRESS") else workers,
                include_dashboard=False,
                ignore_reinit_error=True,
                log_to_driver=False,
            )

    def map_unordered(self, fn: Callable[[Job], TrialResult], jobs: Sequence[Job]) -> Iterator[TrialResult]:
        remote = self.ray.remote(num_cpus=1)(fn)
        pending = [remote.remote(job) for job in jobs]
        while pending:
            done, pending = self.ray.wait(pending, num_returns=1)
            yield self.ray.get(done[0])


EXECUTORS: Registry[type] = Registry("executor", {"local": LocalExecutor, "ray": RayExecutor}, where="eval.executor")


def make_executor(name: str, workers: int = 1):
    return EXECUTORS.load(name)(workers)


def resolve_suite(name: str | Path, search: Iterable[Path] = ()) -> Path:
    """A suite path, or a suite name looked up in `search` and ./examples/suites."""
    path = Path(name)
    if path.exists():
        return path
    dirs = [*search, Path.cwd() / "examples" / "suites"]
    for d in dirs:
        if (d / str(name)).exists():
            return d / str(name)
    known = sorted({p.name for d in dirs if d.is_dir() for p in d.iterdir() if p.is_dir()})
    raise TaskSpecError(
        f"suite {str(name)!r} not found; pass a suite folder or one of: {', '.join(known) or '(none found)'}"
    )


def select_tasks(tasks: Iterable[Task], created_after: str | None) -> tuple[list[Task], list[Task]]:
    """(kept, dropped): tasks created before `created_after` are dropped; undated ones are kept."""
    if not created_after:
        return list(tasks), []
    kept, dropped = [], []
    for task in tasks:
        (dropped if task.created_at is not None and task.created_at < created_after else kept).append(task)
    return kept, dropped


def split_for_fitting(items: Iterable[Any], config: LagoonConfig) -> tuple[list[Any], list[Any]]:
    """(usable, held_out) for router fitting / calibration. Items are Tasks or TrialResults."""
    usable, held = [], []
    for item in items:
        if isinstance(item, Task):
            out = is_held_out(item, config)
        else:
            probe = Task(
                id=item.task_id, format=item.format, instruction="-", path=Path("."),
                repo=item.repo, created_at=item.created_at,
            )
            out = is_held_out(probe, config)
        (held if out else usable).append(item)
    return usable, held


def read_results(path: Path) -> list[TrialResult]:
    """The trials of a results.jsonl; a torn last line (a killed run) is dropped and the file
    repaired. A whole line that is not a trial result is an error naming it (TaskSpecError)."""
    if not path.is_file():
        return []
    seen = JsonlRead()
    rows = [TrialResult.from_row(row, where) for where, row in read_jsonl(path, torn_ok=True, stats=seen)]
    if seen.bad or seen.torn:
        write_atomic(path, "".join(json.dumps(r.to_row(), sort_keys=True) + "\n" for r in rows))
    return rows


def _append(path: Path, result: TrialResult) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(result.to_row(), sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


@dataclass
class RunOutcome:
    out_dir: Path
    results: list[TrialResult]
    """Every trial of this run, including ones resumed from an earlier interrupted run."""
    spec_errors: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    """Task ids left out by the created-after filter."""
    resumed: int = 0


def run_suite(
    suite: str | Path,
    agent: str,
    config: LagoonConfig,
    out_dir: str | Path,
    *,
    workers: int | None = None,
    executor: str | None = None,
    created_after: str | None = None,
    attempts: int = 1,
    model_factory: ModelFactory | None = None,
    only: Sequence[str] | None = None,
    progress: bool = False,
    on_result: Callable[[TrialResult], None] | None = None,
) -> RunOutcome:
    """Run `agent` on every selected task of `suite` `attempts` times; see the module docstring."""
    AGENTS.check(agent)
    if attempts < 1:
        raise ConfigError(f"attempts must be at least 1 (got {attempts})")
    split = parse_date(created_after or config.eval.created_after, "created_after")
    if split != config.eval.created_after:
        config = config.model_copy(deep=True)
        config.eval.created_after = split
    loaded = load_suite(resolve_suite(suite))
    tasks, dropped = select_tasks(loaded.tasks, split)
    if only:
        wanted = set(only)
        tasks = [t for t in tasks if t.id in wanted]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.jsonl"
    previous = read_results(results_path)
    agents_seen = {r.agent for r in previous}
    if previous and agents_seen != {agent}:
        raise ConfigError(
            f"{results_path} holds results of agent {sorted(map(str, agents_seen))}, not {agent!r}; "
            "use another --out folder or the same agent to resume"
        )
    done = {(r.task_id, r.attempt) for r in previous}
    ids = {t.id for t in tasks}
    kept_prev = [r for r in previous if r.task_id in ids]
    jobs: list[Job] = [
        (task, agent, config, a, model_factory)
        for a in range(attempts)
        for task in tasks
        if (task.id, a) not in done
    ]
    outcome = RunOutcome(
        out_dir=out,
        results=kept_prev,
        spec_errors=[str(e) for e in loaded.errors],
        dropped=[t.id for t in dropped],
        resumed=len(kept_prev),
    )
    ex = make_executor(executor or config.eval.executor, workers or config.eval.workers)
    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        bar.start()
        bar_id = bar.add_task(f"eval {agent}", total=len(jobs) + len(kept_prev), completed=len(kept_prev))
    try:
        for row in ex.map_unordered(_work, jobs):
            _append(results_path, row)
            outcome.results.append(row)
            if on_result is not None:
                on_result(row)
            if bar is not None:
                bar.update(bar_id, advance=1, description=f"eval {agent}: {row.task_id} {row.status}")
    finally:
        if bar is not None:
            bar.stop()
    return outcome
