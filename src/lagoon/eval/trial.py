"""One trial: a fresh workspace for one task, one agent's attempt, the task's own tests, one result.

`run_trial(task, agent, config)` returns a `TrialResult` (``format_version`` 1). The agent is
picked by short name from `AGENTS`: ``oracle`` runs the task's reference solution (proves the task
is solvable), ``none`` does nothing (proves the tests fail first), ``lagoon`` runs
`lagoon.agent.run_task` in the same sandbox the tests use (imported only when asked for).

Scoring follows each format's own rule: Terminal-Bench 1 passes when ``run-tests.sh`` exits 0 and no
parsed pytest test failed; Terminal-Bench 2 passes when the verifier wrote a reward of 1
(``reward.txt`` or ``rewards.json``); SWE-bench passes when every FAIL_TO_PASS and PASS_TO_PASS test
passes after the test patch is applied. An environment that cannot be built without Docker gives
status ``environment_unsupported``, which is not counted as the agent's failure.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from lagoon.config import LagoonConfig
from lagoon.errors import TaskSpecError
from lagoon.eval.result import RESULT_FORMAT_VERSION, CommandRecord, TokenCounts, TrialResult
from lagoon.eval.sandbox import EnvironmentUnsupported, Sandbox, build_environment
from lagoon.eval.tasks import Task
from lagoon.registry import Registry

__all__ = ["run_trial", "ScriptedModels", "AGENTS", "RESULT_FORMAT_VERSION", "parse_pytest", "is_held_out"]

_PYTEST_LINE = re.compile(r"^(PASSED|FAILED|ERROR|XPASS|XFAIL|SKIPPED)\s+(\S+)", re.M)

ModelFactory = Callable[[Task], Any]


def parse_pytest(output: str) -> dict[str, bool]:
    """Test id → passed, from pytest's ``-rA`` short summary (XFAIL counts as passed)."""
    results: dict[str, bool] = {}
    for status, name in _PYTEST_LINE.findall(output):
        results[name] = status in {"PASSED", "XFAIL"}
    return results


def is_held_out(task: Task, config: LagoonConfig) -> bool:
    """True when the task must never feed router fitting or calibration: its repo is in
    ``evaluation.holdout_repos``, or ``evaluation.temporal_split`` is on and the task was created on
    or after the split date (``eval.created_after``) or has no date at all."""
    ev = config.model_deployment.evaluation
    if task.repo and task.repo in ev.holdout_repos:
        return True
    split = config.eval.created_after
    if ev.temporal_split and split:
        return task.created_at is None or task.created_at >= split
    return False


def _new_result(task: Task, agent: str, attempt: int, config: LagoonConfig, sandbox: Sandbox) -> TrialResult:
    return TrialResult(
        task_id=task.id, attempt=attempt, agent=agent, format=task.format, category=task.category,
        difficulty=task.difficulty, repo=task.repo, created_at=task.created_at,
        held_out=is_held_out(task, config), sandbox=sandbox.kind,
    )


# ------------------------------------------------------------------------------------------------
# Agents
# ------------------------------------------------------------------------------------------------


def _agent_none(task: Task, sandbox: Sandbox, config: LagoonConfig, result: TrialResult, model: Any) -> None:
    return None


def _agent_oracle(task: Task, sandbox: Sandbox, config: LagoonConfig, result: TrialResult, model: Any) -> None:
    if task.swe is not None:
        if not task.swe.patch:
            raise TaskSpecError(f"{task.path}: instance {task.id} has no 'patch'; the oracle needs the gold patch")
        proc = _git(sandbox.root, "apply", "--whitespace=nowarn", "-", input=task.swe.patch)
        result.commands.append(CommandRecord(command="git apply <gold patch>", exit_code=proc.returncode))
        result.steps = 1
        return
    if task.solution is None:
        raise TaskSpecError(f"{task.path}: no reference solution (solution.sh or solution/solve.sh) for the oracle")
    sb = sandbox.with_mounts(solution=(task.solution.parent, False))
    command = f"bash {sb.path_of('/solution/' + task.solution.name)}"
    out = sb.execute(command, timeout_s=task.agent_timeout_s or config.eval.task_timeout_s)
    result.commands.append(CommandRecord(command=command, exit_code=out.exit_code))
    result.steps = 1
    if out.timed_out:
        result.failure_mode = "agent_timeout"


def _agent_lagoon(task: Task, sandbox: Sandbox, config: LagoonConfig, result: TrialResult, model: Any) -> None:
    from lagoon.agent import run_task
    from lagoon.routing.backends.local import expert_load_totals

    cfg = config.model_copy(deep=True)
    cfg.agent.time_limit_s = task.agent_timeout_s or config.eval.task_timeout_s
    agent_env = replace(sandbox, state_dir=sandbox.root.parent / "shell-state")
    # Terminal-Bench instructions name container paths (/app/...); the agent's file tools take
    # workspace-relative paths, so say where the workspace sits.
    note = (
        f"\n\n(The workspace is {sandbox.workdir}; shell commands run there. File tools take paths "
        f"relative to it, e.g. {sandbox.workdir}/x.py is x.py.)"
    )
    load_before = expert_load_totals()
    run = run_task(
        task.instruction + note,
        sandbox.root,
        cfg,
        model=model,
        environment=agent_env,
        session_id=f"eval-{task.id}-{result.attempt}",
    )
    result.agent_exit = run.exit_status
    result.steps = run.steps
    result.commands = [CommandRecord(command=str(c.get("command", "")), exit_code=c.get("exit_code"))
                       for c in run.commands]
    result.tokens = TokenCounts(input=run.input_tokens, output=run.output_tokens,
                                total=run.input_tokens + run.output_tokens)
    result.cost_usd = run.cost_usd
    result.validation_failures = run.validation_failures
    result.backends = {str(k): int(v) for k, v in run.backends.items()}
    result.expert_load = _load_delta(load_before, expert_load_totals())
    if run.exit_status and run.exit_status != "submitted":
        result.failure_mode = "agent_" + run.exit_status


def _load_delta(before: list[int] | None, after: list[int] | None) -> list[int] | None:
    """This trial's expert load: the engines' totals now minus before (an engine loaded during the
    trial counts from zero); None when no in-process MoE model routed a token."""
    if after is None:
        return None
    if before is None or len(before) != len(after):
        before = [0] * len(after)
    delta = [a - b for a, b in zip(after, before, strict=True)]
    return delta if any(delta) else None


AGENTS: Registry[Callable[..., None]] = Registry(
    "agent", {"lagoon": _agent_lagoon, "oracle": _agent_oracle, "none": _agent_none}, where="--agent"
)


# ------------------------------------------------------------------------------------------------
# Workspaces and scoring
# ------------------------------------------------------------------------------------------------


def _git(cwd: Path, *args: str, input: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["git", "-c", "advice.detachedHead=false", *args],
        cwd=cwd, input=input, capture_output=True, text=True, check=False, timeout=120,
    )


@contextlib.contextmanager
def _mirror_lock(mirror: Path):
    with open(mirror / "lagoon-worktree.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _swe_checkout(task: Task, ws: Path) -> None:
    swe = task.swe
    assert swe is not None
    with _mirror_lock(swe.mirror):
        proc = _git(swe.mirror, "worktree", "add", "--detach", str(ws), swe.base_commit)
    if proc.returncode != 0:
        raise TaskSpecError(
            f"{task.path}: instance {task.id}: cannot check out base_commit {swe.base_commit} of {swe.mirror}: "
            f"{proc.stderr.strip()[-300:]}"
        )


def _swe_release(task: Task, ws: Path) -> None:
    swe = task.swe
    assert swe is not None
    with _mirror_lock(swe.mirror):
        _git(swe.mirror, "worktree", "remove", "--force", str(ws))
        _git(swe.mirror, "worktree", "prune")


def _score_swe(task: Task, sandbox: Sandbox, result: TrialResult, timeout: float) -> None:
    swe = task.swe
    assert swe is not None
    ws = sandbox.root
    for path in re.findall(r"^diff --git a/(\S+) b/", swe.test_patch, re.M):
        if _git(ws, "cat-file", "-e", f"{swe.base_commit}:{path}").returncode == 0:
            _git(ws, "checkout", swe.base_commit, "--", path)
        else:
            (ws / path).unlink(missing_ok=True)
    applied = _git(ws, "apply", "--whitespace=nowarn", "-", input=swe.test_patch)
    if applied.returncode != 0:
        result.failure_mode = "test_patch_failed"
        result.test_output = applied.stderr[-2000:]
        return
    tests = [*swe.fail_to_pass, *swe.pass_to_pass]
    command = swe.test_cmd.replace("{tests}", " ".join(shlex.quote(t) for t in tests))
    out = sandbox.execute(command, timeout_s=timeout)
    parsed = parse_pytest(out.output)
    result.tests = {t: parsed.get(t, False) for t in tests}
    result.passed = all(result.tests.values())
    result.test_output = out.output[-2000:]
    if out.timed_out:
        result.failure_mode = "test_timeout"


def _score_tb(task: Task, sandbox: Sandbox, tmp: Path, result: TrialResult, timeout: float) -> None:
    assert task.tests_dir is not None and task.test_script is not None
    stage, logs = tmp / "tests", tmp / "logs"
    shutil.copytree(task.tests_dir, stage)
    logs.mkdir()
    if task.format == "tb1":
        shutil.copy2(task.test_script, stage / "run-tests.sh")
    sb = sandbox.with_mounts(tests=(stage, False), logs__verifier=(logs, True))
    script = "run-tests.sh" if task.format == "tb1" else "test.sh"
    out = sb.execute(f"bash {sb.path_of('/tests/' + script)}", timeout_s=timeout)
    result.test_output = out.output[-2000:]
    result.tests = parse_pytest(out.output)
    if out.timed_out:
        result.failure_mode = "test_timeout"
    if task.format == "tb1":
        result.passed = out.exit_code == 0 and all(result.tests.values())
        result.reward = 1.0 if result.passed else 0.0
        return
    reward: float | None = None
    if (logs / "reward.txt").is_file():
        try:
            reward = float((logs / "reward.txt").read_text().strip())
        except ValueError:
            result.failure_mode = "parse_error"
    elif (logs / "rewards.json").is_file():
        try:
            rewards = json.loads((logs / "rewards.json").read_text())
            values = [float(v) for v in rewards.values()] if isinstance(rewards, dict) else [float(rewards)]
            reward = float(rewards["reward"]) if isinstance(rewards, dict) and "reward" in rewards else min(values)
        except (ValueError, TypeError, AttributeError):
            result.failure_mode = "parse_error"
    elif not result.failure_mode:
        result.failure_mode = "no_reward"
    result.reward = reward
    result.passed = reward is not None and reward >= 1.0 - 1e-9


def run_trial(
    task: Task,
    agent: str,
    config: LagoonConfig,
    *,
    attempt: int = 0,
    model_factory: ModelFactory | None = None,
) -> TrialResult:
    """Run `agent` on a fresh copy of `task` and score it with the task's tests; never raises for a
    task-level problem (it lands in the result's status, failure_mode and error)."""
    play = AGENTS.load(agent)
    ev = config.eval
    with tempfile.TemporaryDirectory(prefix=f"lagoon-eval-{re.sub(r'[^A-Za-z0-9_.-]', '_', task.id)}-") as t:
        tmp = Path(t)
        ws = tmp / "ws"
        sandbox = Sandbox(ws, mode=ev.sandbox, timeout_s=ev.test_timeout_s, output_limit=ev.output_limit_bytes)
        result = _new_result(task, agent, attempt, config, sandbox)
        checked_out = False
        try:
            if task.swe is not None:
                _swe_checkout(task, ws)
                checked_out = True
            else:
                ws.mkdir()
                if task.dockerfile is None and task.extra.get("docker_image"):
                    raise EnvironmentUnsupported(
                        f"{task.path}: prebuilt image {task.extra['docker_image']!r} and no Dockerfile"
                    )
                sandbox = build_environment(sandbox, task.dockerfile, timeout_s=ev.task_timeout_s)
        except EnvironmentUnsupported as exc:
            result.status, result.failure_mode, result.error = "environment_unsupported", "environment_unsupported", str(exc)
            return result
        except TaskSpecError as exc:
            result.status, result.failure_mode, result.error = "error", "setup_error", str(exc)
            return result
        try:
            started = time.monotonic()
            try:
                model = model_factory(task) if model_factory is not None else None
                play(task, sandbox, config, result, model)
            except Exception as exc:  # the agent's failure is a result, not a crash of the run
                result.failure_mode = "agent_error"
                result.error = f"{type(exc).__name__}: {exc}"
            result.latency_ms = (time.monotonic() - started) * 1000.0
            codes = [c.exit_code for c in result.commands if c.exit_code is not None]
            result.command_success_rate = (sum(1 for c in codes if c == 0) / len(codes)) if codes else None
            test_start = time.monotonic()
            timeout = task.test_timeout_s or ev.test_timeout_s
            if task.swe is not None:
                _score_swe(task, sandbox, result, timeout)
            else:
                _score_tb(task, sandbox, tmp, result, timeout)
            result.test_duration_s = time.monotonic() - test_start
            if task.swe is not None:
                result.reward = 1.0 if result.passed else 0.0
            result.status = "passed" if result.passed else "failed"
            if result.failure_mode == "agent_error" and not result.passed:
                result.status = "error"
        finally:
            if checked_out:
                _swe_release(task, ws)
    return result


class ScriptedModels:
    """A picklable model factory for ``--model scripted:DIR``: task `T` replays ``DIR/T.json``
    (the `lagoon.testing.ReplayChatModel` file format); a task without a script gets an empty one,
    so it fails at its first model call instead of reaching a real backend. Given a file instead of
    a folder (``scripted:FILE``), every task replays that one script."""

    def __init__(self, source: Path) -> None:
        if not Path(source).exists():
            raise TaskSpecError(f"scripted model {source} does not exist; pass a folder of TASK_ID.json files or one file")
        self.folder = Path(source)

    def __call__(self, task: Task) -> Any:
        from lagoon.testing import ReplayChatModel

        path = self.folder if self.folder.is_file() else self.folder / f"{task.id}.json"
        return ReplayChatModel.from_file(str(path)) if path.is_file() else ReplayChatModel([])
