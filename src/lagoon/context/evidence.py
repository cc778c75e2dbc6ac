"""`Evidence`: what a run has learned that should steer retrieval, and the query it grows into.

The first retrieval only has the task text, which rarely names the code to change (the sample
task "fix the failing test" retrieves the README). `Evidence.observe(...)` reads what the agent's
tools returned and keeps

- failing tests (pytest's ``FAILED path::test`` / ``ERROR path::test`` summary lines and ``-v``
  lines), forgotten when a later run reports them passed or a whole-suite run passes;
- traceback frames (Python's ``File "x.py", line N, in f`` and pytest's ``x.py:N: in f`` /
  ``x.py:N: Error``) inside the repository, and the exception lines (``E   ...``, ``XError: ...``);
- the functions a failing assertion calls (pytest's ``>`` and ``E`` lines: ``median([1, 2])``),
  which name the code under test better than the test does;
- files the agent opened or edited.

`query(task)` is the task followed by those, most telling first (the functions failing assertions
call, failing tests' words, the innermost frame outside test files, exception text, then edited and
opened files), so BM25 can find the code a test run points at. Evidence helps when it is *new*: the
sample task "fix the failing test" retrieves the README until a failing run names `median`; an
issue text that already holds its traceback gains nothing from reading it twice (measured: recall@1
0.592 vs 0.605 for the issue alone on 157 SWE-bench Lite issues). `revision` counts changes that should trigger re-retrieval (a new failing test or a
new frame); opening a file does not.

This is *not* the retriever (`lagoon.context.retriever`) and runs no command itself.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

__all__ = ["Evidence", "Frame", "parse_failing_tests", "parse_frames", "words_of_test"]

_FAILED = re.compile(r"^(?:FAILED|ERROR) (\S+?::\S+?)(?: - .*)?$", re.M)
_VERBOSE = re.compile(r"^(\S+?\.py::\S+) (FAILED|ERROR|PASSED)\b", re.M)
_PASSED = re.compile(r"^PASSED (\S+?::\S+)", re.M)
_PY_FRAME = re.compile(r'^\s*File "([^"]+)", line (\d+), in (\S+)', re.M)
_PYTEST_FRAME = re.compile(r"^([\w./-]+\.py):(\d+):(?: in (\S+)| (\w+(?:Error|Exception|Failure|Warning|Exit)))?", re.M)
_EXC = re.compile(r"^(?:E\s+)?((?:[A-Za-z_][\w.]*\.)?[A-Z]\w*(?:Error|Exception|Failure)\b:?.{0,160})$", re.M)
_FAIL_LINE = re.compile(r"^(?:>|E)\s+(.*)$", re.M)
_CALL = re.compile(r"\b([A-Za-z_][\w.]*)\s*\(")
_NOT_CODE = frozenset({"assert", "print", "len", "isinstance", "str", "int", "float", "list", "dict", "set",
                       "tuple", "repr", "type", "range", "sorted", "where", "and", "or", "not", "in"})
_SUITE_PASSED = re.compile(r"^=*\s*\d+ passed(?:, \d+ \w+)*(?: in [\d.]+s)?\s*=*$", re.M)
_WORD = re.compile(r"[A-Za-z][a-z0-9]+|[A-Z]+(?![a-z])")

MAX_QUERY_CHARS = 4000
"""The grown query is cut here: past a few thousand characters BM25 only adds noise."""


@dataclass(frozen=True)
class Frame:
    path: str
    line: int
    function: str


def parse_failing_tests(output: str) -> tuple[list[str], list[str]]:
    """(failed, passed) test ids that a pytest output reports, in order of appearance."""
    failed = [m.group(1) for m in _FAILED.finditer(output)]
    passed = [m.group(1) for m in _PASSED.finditer(output)]
    for m in _VERBOSE.finditer(output):
        (passed if m.group(2) == "PASSED" else failed).append(m.group(1))
    return list(dict.fromkeys(failed)), list(dict.fromkeys(passed))


def _relative(path: str, root: str | None, files: frozenset[str] | None = None) -> str | None:
    """`path` relative to the repository, or None when it lies outside (site-packages, the stdlib).
    With the repository's `files`, a path elsewhere (an installed copy, another checkout, as in an
    issue's traceback) maps to the longest tail that names one of them."""
    p = path.replace("\\", "/")
    if files is not None:
        parts = PurePosixPath(p).parts
        for i in range(len(parts)):
            tail = "/".join(parts[i:])
            if tail in files:
                return tail
    if root:
        r = root.rstrip("/") + "/"
        if p.startswith(r):
            p = p[len(r):]
        elif p.startswith("/"):
            return None
    elif p.startswith("/"):
        return None
    if "site-packages/" in p or p.startswith("<"):
        return None
    return str(PurePosixPath(p))


def parse_frames(output: str, root: str | None = None, files: frozenset[str] | None = None) -> list[Frame]:
    """Traceback frames inside the repository, innermost last (as printed)."""
    frames: list[Frame] = []
    for m in _PY_FRAME.finditer(output):
        rel = _relative(m.group(1), root, files)
        if rel is not None:
            frames.append(Frame(rel, int(m.group(2)), m.group(3)))
    for m in _PYTEST_FRAME.finditer(output):
        rel = _relative(m.group(1), root, files)
        if rel is not None:
            frames.append(Frame(rel, int(m.group(2)), m.group(3) or ""))
    return list(dict.fromkeys(frames))


def words_of_test(test_id: str) -> str:
    """`tests/test_stats.py::TestMedian::test_even_list[1]` → 'stats Median even list': the words a
    test's name shares with the code it tests."""
    parts = re.split(r"::|/|\.py\b|\[.*?\]", test_id)
    words = [w for p in parts for w in _WORD.findall(p)]
    return " ".join(w for w in words if w.lower() not in ("test", "tests", "py"))


def _is_test(path: str) -> bool:
    from lagoon.context.retriever import is_test_path

    return is_test_path(path)


@dataclass
class Evidence:
    """Failing tests, traceback frames, exception text and touched files, as observed."""

    root: str | None = None
    files: frozenset[str] | None = None
    """The repository's files, when known: frames printed with other prefixes map onto them."""
    failing: dict[str, None] = field(default_factory=dict)
    frames: dict[Frame, None] = field(default_factory=dict)
    errors: dict[str, None] = field(default_factory=dict)
    called: dict[str, None] = field(default_factory=dict)
    edited: dict[str, None] = field(default_factory=dict)
    opened: dict[str, None] = field(default_factory=dict)
    max_frames: int | None = 1
    """Code frames the query names, innermost first (None: all of them). One: on the 28 SWE-bench
    Lite issues (of 157 measured) whose text holds a traceback into the project, naming every frame
    cost 0.036 at recall@1 and @5; the innermost alone changed nothing (benchmarks/bench_localization.py)."""
    revision: int = 0
    """Bumped by a change that should trigger re-retrieval (a new failing test, frame or error)."""
    news: list[str] = field(default_factory=list)
    """What the last bumps were about, for the snapshot's reason (drained by `take_news`)."""

    def observe_output(self, command: str, output: str, exit_code: int | None) -> None:
        """A command's output: pytest results, tracebacks, exception lines."""
        failed, passed = parse_failing_tests(output)
        for t in passed:
            self.failing.pop(t, None)
        if exit_code == 0 and "pytest" in command and _SUITE_PASSED.search(output):
            named = [t for t in self.failing if t in command or t.split("::")[0] in command]
            for t in (named if named else list(self.failing)):
                self.failing.pop(t, None)
        new = [t for t in failed if t not in self.failing]
        for t in failed:
            self.failing[t] = None
        new_frames = [f for f in parse_frames(output, self.root, self.files) if f not in self.frames]
        for f in new_frames:
            self.frames[f] = None
        for m in _EXC.finditer(output):
            self.errors.setdefault(m.group(1).strip()[:160], None)
        for line in _FAIL_LINE.finditer(output):
            for name in _CALL.findall(line.group(1)):
                leaf = name.rsplit(".", 1)[-1]
                if leaf not in _NOT_CODE and not leaf.startswith("test"):
                    self.called.setdefault(leaf, None)
        if new or new_frames:
            self.revision += 1
            self.news.append(", ".join([f"test {t} failed" for t in new]
                                       + [f"traceback through {f.path}:{f.line}" for f in new_frames[:3]]))

    def observe_files(self, paths: Iterable[str], *, edited: bool) -> None:
        for p in paths:
            (self.edited if edited else self.opened)[p] = None

    def take_news(self) -> str:
        text = "; ".join(n for n in self.news if n)
        self.news.clear()
        return text

    def query(self, task: str) -> str:
        """The retrieval query: `task`, then what the run learned (see the module docstring)."""
        parts = [task]
        parts += [f"{name} {name}" for name in list(self.called)[:10]]  # twice: weighs sqrt(2) in BM25
        parts += [words_of_test(t) for t in self.failing]  # not the id itself: "test" would pull in every test
        code_frames = [f for f in self.frames if not _is_test(f.path)]
        test_frames = [f for f in self.frames if _is_test(f.path)]
        innermost = list(reversed(code_frames))[: self.max_frames]
        parts += [f"{f.path} {f.function}".strip() for f in innermost]
        parts += [f.function for f in test_frames if f.function]
        parts += list(self.errors)[-5:]
        parts += list(self.edited) + [p for p in self.opened if p not in self.edited]
        return "\n".join(parts)[:MAX_QUERY_CHARS]

    def to_dict(self) -> dict[str, object]:
        return {"failing_tests": list(self.failing), "called": list(self.called), "frames": [f"{f.path}:{f.line} {f.function}".strip()
                                                               for f in self.frames],
                "errors": list(self.errors), "edited": list(self.edited), "opened": list(self.opened)}
