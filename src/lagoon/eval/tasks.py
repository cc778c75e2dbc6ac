"""Task suites: Terminal-Bench 1, Terminal-Bench 2 (Harbor) and SWE-bench JSONL, read into `Task`s.

A suite is a folder. Every folder below it that holds a ``task.yaml`` is a Terminal-Bench 1 task
(instruction in the YAML, ``tests/``, ``run-tests.sh``, ``solution.sh``, optional ``Dockerfile``);
every folder with a ``task.toml`` is a Terminal-Bench 2 / Harbor task (``instruction.md``,
``tests/test.sh`` writing ``/logs/verifier/reward.txt`` or ``rewards.json``, ``solution/solve.sh``,
``environment/Dockerfile``). Every ``*.jsonl`` outside a task folder holds SWE-bench instances and
needs a ``swebench.yaml`` beside it: a mirror map (repo name → local git repository, or a script that
builds one — nothing is fetched from the network) and a per-repo test command.

`load_suite` never stops at a bad task: each problem becomes a `TaskSpecError` naming the file and
the field, returned next to the tasks that did load. This module reads specs only; building the
environment and running anything is `sandbox.py` and `runner.py`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from lagoon.cache_dir import cache_root
from lagoon.errors import TaskSpecError
from lagoon.jsonl import read_jsonl
from lagoon.yaml_loader import DuplicateKeyError, load_yaml

__all__ = ["Task", "SweInstance", "Suite", "load_suite", "parse_date"]

TaskFormat = Literal["tb1", "tb2", "swebench"]
_SKIP_DIRS = {".git", "node_modules", "__pycache__", ".venv", "mirrors"}


@dataclass(frozen=True)
class SweInstance:
    """The SWE-bench part of a task: where the repository is and how its tests are judged."""

    instance_id: str
    repo: str
    mirror: Path
    base_commit: str
    patch: str
    test_patch: str
    fail_to_pass: tuple[str, ...]
    pass_to_pass: tuple[str, ...]
    test_cmd: str
    """Shell command; ``{tests}`` is replaced by the quoted test ids."""


@dataclass(frozen=True)
class Task:
    """One task, whatever its format. Paths are absolute on the host."""

    id: str
    format: TaskFormat
    instruction: str
    path: Path
    category: str = "uncategorized"
    difficulty: str | None = None
    tags: tuple[str, ...] = ()
    created_at: str | None = None
    """ISO date (YYYY-MM-DD) the task was created, when the spec says."""
    repo: str | None = None
    agent_timeout_s: float | None = None
    test_timeout_s: float | None = None
    dockerfile: Path | None = None
    tests_dir: Path | None = None
    test_script: Path | None = None
    """run-tests.sh (tb1) or tests/test.sh (tb2)."""
    solution: Path | None = None
    """solution.sh (tb1) or solution/solve.sh (tb2); None when the task ships none."""
    swe: SweInstance | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Suite:
    root: Path
    tasks: list[Task]
    errors: list[TaskSpecError]


def parse_date(value: Any, where: str) -> str | None:
    """A date or timestamp → 'YYYY-MM-DD'; None stays None; anything else is a TaskSpecError."""
    if value is None or value == "":
        return None
    if isinstance(value, dt.datetime):
        return value.date().isoformat()
    if isinstance(value, dt.date):
        return value.isoformat()
    text = str(value).strip()
    try:
        return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).date().isoformat()
    except ValueError:
        raise TaskSpecError(f"{where}: {value!r} is not a date; write it as YYYY-MM-DD") from None


def _num(data: Mapping[str, Any], key: str, where: str) -> float | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise TaskSpecError(f"{where}: field '{key}' must be a positive number of seconds, got {value!r}")
    return float(value)


def _str_list(value: Any, where: str, key: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TaskSpecError(f"{where}: field '{key}' must be a list of strings, got {value!r}")
    return tuple(value)


def _yaml_mapping(path: Path, fields: str, *, empty_ok: bool = False) -> dict[str, Any]:
    """A task file's YAML mapping; TaskSpecError naming the file for bad YAML, a key named twice,
    or a top level that is not a mapping (with `fields`)."""
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except DuplicateKeyError as exc:
        raise TaskSpecError(f"{path}: {_twice(exc)}") from None
    except yaml.YAMLError as exc:
        raise TaskSpecError(f"{path}: invalid YAML ({exc}); fix the syntax") from None
    if data is None and empty_ok:
        return {}
    if not isinstance(data, dict):
        raise TaskSpecError(f"{path}: the top level must be a mapping with {fields}")
    return data


def _twice(exc: DuplicateKeyError) -> str:
    return (f"field {exc.key!r} appears twice (lines {exc.context_mark.line + 1} and {exc.problem_mark.line + 1}); "
            "keep only one")


def _tb1(folder: Path) -> Task:
    spec = folder / "task.yaml"
    data = _yaml_mapping(spec, "an 'instruction' field")
    instruction = data.get("instruction")
    if instruction is None and isinstance(data.get("descriptions"), list):
        base = [d for d in data["descriptions"] if isinstance(d, dict) and d.get("key", "base") == "base"]
        instruction = base[0].get("description") if base else None
    if not isinstance(instruction, str) or not instruction.strip():
        raise TaskSpecError(f"{spec}: field 'instruction' is missing or empty; add the task's instruction text")
    script = folder / "run-tests.sh"
    if not script.is_file():
        raise TaskSpecError(f"{folder}: file 'run-tests.sh' is missing; add the script that runs the tests")
    tests = folder / "tests"
    if not tests.is_dir():
        raise TaskSpecError(f"{folder}: folder 'tests/' is missing; add the task's tests")
    solution = folder / "solution.sh"
    dockerfile = folder / "Dockerfile"
    return Task(
        id=folder.name,
        format="tb1",
        instruction=instruction.strip(),
        path=folder,
        category=str(data.get("category") or "uncategorized"),
        difficulty=data.get("difficulty"),
        tags=_str_list(data.get("tags"), str(spec), "tags"),
        created_at=parse_date(data.get("created_at", data.get("date")), f"{spec}: field 'created_at'"),
        agent_timeout_s=_num(data, "max_agent_timeout_sec", str(spec)),
        test_timeout_s=_num(data, "max_test_timeout_sec", str(spec)),
        dockerfile=dockerfile if dockerfile.is_file() else None,
        tests_dir=tests,
        test_script=script,
        solution=solution if solution.is_file() else None,
    )


def _tb2(folder: Path) -> Task:
    spec = folder / "task.toml"
    try:
        data = tomllib.loads(spec.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise TaskSpecError(f"{spec}: invalid TOML ({exc}); fix the syntax") from None
    sections = {}
    for name in ("metadata", "verifier", "agent", "environment"):
        value = data.get(name, {})
        if not isinstance(value, dict):
            raise TaskSpecError(f"{spec}: '{name}' must be a table ([{name}])")
        sections[name] = value
    meta = sections["metadata"]
    instruction_file = folder / "instruction.md"
    if not instruction_file.is_file():
        raise TaskSpecError(f"{folder}: file 'instruction.md' is missing; add the task's instruction")
    instruction = instruction_file.read_text(encoding="utf-8").strip()
    if not instruction:
        raise TaskSpecError(f"{instruction_file}: the instruction is empty; write the task's instruction")
    test_sh = folder / "tests" / "test.sh"
    if not test_sh.is_file():
        raise TaskSpecError(f"{folder}: file 'tests/test.sh' is missing; add the verifier script")
    solve = folder / "solution" / "solve.sh"
    dockerfile = folder / "environment" / "Dockerfile"
    return Task(
        id=folder.name,
        format="tb2",
        instruction=instruction,
        path=folder,
        category=str(meta.get("category") or "uncategorized"),
        difficulty=meta.get("difficulty"),
        tags=_str_list(meta.get("tags"), str(spec), "metadata.tags"),
        created_at=parse_date(meta.get("created_at"), f"{spec}: field 'metadata.created_at'"),
        agent_timeout_s=_num(sections["agent"], "timeout_sec", f"{spec} [agent]"),
        test_timeout_s=_num(sections["verifier"], "timeout_sec", f"{spec} [verifier]"),
        dockerfile=dockerfile if dockerfile.is_file() else None,
        tests_dir=folder / "tests",
        test_script=test_sh,
        solution=solve if solve.is_file() else None,
        extra={"docker_image": sections["environment"].get("docker_image")},
    )


def _cache_root() -> Path:
    return cache_root() / "mirrors"


def _build_mirror(script: Path, name: str, where: str) -> Path:
    """Run a mirror-building script once per script content; the result is cached by its hash."""
    if not script.is_file():
        raise TaskSpecError(f"{where}: build script {script} does not exist; fix the 'build' field")
    digest = hashlib.sha256(script.read_bytes()).hexdigest()[:16]
    dest = _cache_root() / digest / (name.replace("/", "__") + ".git")
    if dest.exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".build-"))
    out = tmp / "repo.git"
    proc = subprocess.run(
        [sys.executable, str(script), str(out)], capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0 or not out.exists():
        raise TaskSpecError(f"{where}: build script {script} failed (exit {proc.returncode}): {proc.stderr[-500:]}")
    try:
        out.rename(dest)
    except OSError:  # another process built it first
        if not dest.exists():
            raise
    subprocess.run(["rm", "-rf", str(tmp)], check=False)
    return dest


def _swe_spec(jsonl: Path) -> tuple[dict[str, Path | str], dict[str, dict[str, Any]]]:
    spec_path = jsonl.parent / "swebench.yaml"
    if not spec_path.is_file():
        raise TaskSpecError(
            f"{jsonl}: no swebench.yaml beside it; add one with 'mirrors' (repo → local path) and 'repos' "
            "(repo → test_cmd)"
        )
    spec = _yaml_mapping(spec_path, "'mirrors' and 'repos'", empty_ok=True)
    mirrors: dict[str, Path | str] = {}
    for repo, entry in (spec.get("mirrors") or {}).items():
        where = f"{spec_path}: field 'mirrors.{repo}'"
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or not ({"path", "build"} & set(entry)):
            raise TaskSpecError(f"{where}: give a 'path' to a local git repository or a 'build' script")
        path = entry.get("path")
        if path and (jsonl.parent / path).exists():
            mirrors[repo] = (jsonl.parent / path).resolve()
        elif entry.get("build"):
            mirrors[repo] = f"build:{(jsonl.parent / entry['build']).resolve()}"
        else:
            raise TaskSpecError(f"{where}: path {path!r} does not exist and no 'build' script is given")
    repos = spec.get("repos") or {}
    if not isinstance(repos, dict):
        raise TaskSpecError(f"{spec_path}: field 'repos' must map repo names to {{test_cmd: ...}}")
    for repo, entry in repos.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("test_cmd"), str):
            raise TaskSpecError(f"{spec_path}: field 'repos.{repo}.test_cmd' is missing; give the test command")
    return mirrors, repos


def _test_list(row: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = row.get(key)
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise TaskSpecError(f"{where}: field '{key}' is not a JSON list of test ids") from None
    return _str_list(value, where, key)


def _swe_tasks(jsonl: Path, errors: list[TaskSpecError]) -> list[Task]:
    try:
        mirrors, repos = _swe_spec(jsonl)
    except TaskSpecError as exc:
        errors.append(exc)
        return []
    built: dict[str, Path] = {}
    tasks = []
    for where, row in read_jsonl(jsonl, error=TaskSpecError, errors=errors):
        try:
            for key in ("instance_id", "repo", "base_commit", "problem_statement", "test_patch"):
                if not isinstance(row.get(key), str) or not row[key]:
                    raise TaskSpecError(f"{where}: field '{key}' is missing or not a string")
            repo = row["repo"]
            f2p = _test_list(row, "FAIL_TO_PASS", where)
            p2p = _test_list(row, "PASS_TO_PASS", where)
            if not f2p:
                raise TaskSpecError(f"{where}: field 'FAIL_TO_PASS' is empty; list the tests the fix must make pass")
            local = (jsonl.parent / repo) if not os.path.isabs(repo) else Path(repo)
            if repo in mirrors:
                mirror = mirrors[repo]
                if isinstance(mirror, str):
                    if repo not in built:
                        built[repo] = _build_mirror(Path(mirror[6:]), repo, f"{jsonl.parent / 'swebench.yaml'}")
                    mirror = built[repo]
            elif (local / ".git").exists() or (local / "HEAD").is_file():
                mirror = local.resolve()
            else:
                raise TaskSpecError(
                    f"{where}: field 'repo' ({repo!r}) has no mirror and is not a local git repository; "
                    "add it under 'mirrors' in swebench.yaml (no network is used)"
                )
            if repo not in repos:
                raise TaskSpecError(f"{where}: field 'repo' ({repo!r}) has no entry under 'repos' in swebench.yaml")
            tasks.append(
                Task(
                    id=row["instance_id"],
                    format="swebench",
                    instruction=row["problem_statement"].strip(),
                    path=jsonl,
                    category=str(row.get("category") or "swebench"),
                    created_at=parse_date(row.get("created_at"), f"{where}: field 'created_at'"),
                    repo=repo,
                    agent_timeout_s=_num(row, "agent_timeout_sec", where),
                    test_timeout_s=_num(row, "test_timeout_sec", where),
                    swe=SweInstance(
                        instance_id=row["instance_id"],
                        repo=repo,
                        mirror=Path(mirror),
                        base_commit=row["base_commit"],
                        patch=str(row.get("patch") or ""),
                        test_patch=row["test_patch"],
                        fail_to_pass=f2p,
                        pass_to_pass=p2p,
                        test_cmd=repos[repo]["test_cmd"],
                    ),
                )
            )
        except TaskSpecError as exc:
            errors.append(exc)
    return tasks


def _walk(folder: Path, tasks: list[Task], errors: list[TaskSpecError]) -> None:
    if (folder / "task.yaml").is_file() or (folder / "task.toml").is_file():
        loader = _tb1 if (folder / "task.yaml").is_file() else _tb2
        try:
            tasks.append(loader(folder))
        except TaskSpecError as exc:
            errors.append(exc)
        except (OSError, UnicodeDecodeError) as exc:
            errors.append(TaskSpecError(f"{folder}: cannot read the task ({exc})"))
        return
    for child in sorted(folder.iterdir()):
        if child.is_dir() and child.name not in _SKIP_DIRS and not child.name.startswith("."):
            _walk(child, tasks, errors)
        elif child.is_file() and child.suffix == ".jsonl":
            tasks.extend(_swe_tasks(child, errors))


def load_suite(root: str | Path) -> Suite:
    """Every task under `root` plus a TaskSpecError for each one that could not be read."""
    root = Path(root).resolve()
    if not root.exists():
        raise TaskSpecError(f"{root}: no such suite folder; pass the path of a task suite")
    tasks: list[Task] = []
    errors: list[TaskSpecError] = []
    if root.is_file() and root.suffix == ".jsonl":
        tasks = _swe_tasks(root, errors)
    else:
        _walk(root, tasks, errors)
    seen: dict[str, Task] = {}
    unique = []
    for task in tasks:
        if task.id in seen:
            errors.append(
                TaskSpecError(f"{task.path}: task id '{task.id}' is also used by {seen[task.id].path}; rename one")
            )
            continue
        seen[task.id] = task
        unique.append(task)
    return Suite(root=root, tasks=unique, errors=errors)
