"""Build `minicalc`, the tiny git repository the starter's SWE-bench-format instances point at.

    python build_repo.py DEST            # a bare mirror of the repository at DEST
    python build_repo.py --jsonl FILE    # also (re)write the instances that reference it

Commits use fixed names and dates, so the hashes (and the `base_commit` in instances.jsonl) are the
same on every machine. The base commit holds three bugs; each instance's `patch` fixes one, and its
`test_patch` adds the tests that fail before the fix (FAIL_TO_PASS) next to tests that already pass
(PASS_TO_PASS). The harness finds this script through the mirror map in swebench.yaml.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ENV = {
    "GIT_AUTHOR_NAME": "Lagoon Fixture",
    "GIT_AUTHOR_EMAIL": "fixture@lagoon.invalid",
    "GIT_AUTHOR_DATE": "2025-03-01T12:00:00+00:00",
    "GIT_COMMITTER_NAME": "Lagoon Fixture",
    "GIT_COMMITTER_EMAIL": "fixture@lagoon.invalid",
    "GIT_COMMITTER_DATE": "2025-03-01T12:00:00+00:00",
    "GIT_CONFIG_NOSYSTEM": "1",
    "HOME": tempfile.gettempdir(),
}

BASE = {
    "README.md": "# minicalc\n\nSmall numeric helpers.\n",
    "minicalc/__init__.py": "from minicalc.ops import add, clamp, mean, parse_numbers\n\n__all__ = ['add', 'clamp', 'mean', 'parse_numbers']\n",
    "minicalc/ops.py": '''"""Small numeric helpers."""


def add(a, b):
    return a + b


def mean(values):
    """Arithmetic mean of a non-empty sequence."""
    return sum(values) / (len(values) - 1)


def clamp(x, lo, hi):
    """x limited to the closed interval [lo, hi]."""
    if x < lo:
        return lo
    if x > hi:
        return x
    return x


def parse_numbers(text):
    """'1, 2,3' -> [1, 2, 3]: integers separated by commas and optional spaces."""
    return [int(part) for part in text.split(",")]
''',
    "tests/__init__.py": "",
    "tests/test_ops.py": '''from minicalc import add


def test_add():
    assert add(2, 3) == 5


def test_add_negative():
    assert add(-2, 3) == 1
''',
}

INSTANCES = [
    {
        "instance_id": "minicalc__mean-1",
        "problem_statement": "mean() returns the wrong value: mean([1, 2, 3]) gives 3.0 instead of 2.0.",
        "created_at": "2025-03-10T09:00:00Z",
        "fix": ("    return sum(values) / (len(values) - 1)\n", "    return sum(values) / len(values)\n"),
        "test_file": "tests/test_mean.py",
        "tests": '''from minicalc import mean


def test_mean_of_three():
    assert mean([1, 2, 3]) == 2.0


def test_mean_of_one():
    assert mean([5]) == 5.0
''',
        "fail_to_pass": ["tests/test_mean.py::test_mean_of_three", "tests/test_mean.py::test_mean_of_one"],
    },
    {
        "instance_id": "minicalc__clamp-2",
        "problem_statement": "clamp(x, lo, hi) does not limit values above hi: clamp(15, 0, 10) returns 15, expected 10.",
        "created_at": "2025-06-02T15:30:00Z",
        "fix": ("    if x > hi:\n        return x\n", "    if x > hi:\n        return hi\n"),
        "test_file": "tests/test_clamp.py",
        "tests": '''from minicalc import clamp


def test_clamp_high():
    assert clamp(15, 0, 10) == 10


def test_clamp_inside_and_low():
    assert clamp(5, 0, 10) == 5
    assert clamp(-1, 0, 10) == 0
''',
        "fail_to_pass": ["tests/test_clamp.py::test_clamp_high"],
    },
    {
        "instance_id": "minicalc__parse-3",
        "problem_statement": "parse_numbers fails on empty input and trailing commas: parse_numbers('') should be [] and "
        "parse_numbers('1, 2,') should be [1, 2].",
        "created_at": "2025-09-20T08:15:00Z",
        "fix": (
            '    return [int(part) for part in text.split(",")]\n',
            '    return [int(part) for part in text.split(",") if part.strip()]\n',
        ),
        "test_file": "tests/test_parse.py",
        "tests": '''from minicalc import parse_numbers


def test_parse_spaces():
    assert parse_numbers("1, 2,3") == [1, 2, 3]


def test_parse_empty_and_trailing():
    assert parse_numbers("") == []
    assert parse_numbers("1, 2,") == [1, 2]
''',
        "fail_to_pass": ["tests/test_parse.py::test_parse_empty_and_trailing"],
        "pass_to_pass_extra": ["tests/test_parse.py::test_parse_spaces"],
    },
]


def git(cwd: Path, *args: str) -> str:
    cmd = ["git", "-c", "init.defaultBranch=main", "-c", "commit.gpgsign=false", "-c", "core.autocrlf=false", *args]
    return subprocess.run(cmd, cwd=cwd, env={**os.environ, **ENV}, check=True, capture_output=True, text=True).stdout


def build(dest: Path) -> tuple[str, list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "minicalc"
        work.mkdir()
        git(work, "init", "-q")
        for name, text in BASE.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_text(text)
        git(work, "add", "-A")
        git(work, "commit", "-q", "-m", "minicalc: add, mean, clamp, parse_numbers")
        base = git(work, "rev-parse", "HEAD").strip()
        rows = []
        ops = work / "minicalc" / "ops.py"
        for inst in INSTANCES:
            old, new = inst["fix"]
            ops.write_text(ops.read_text().replace(old, new))
            patch = git(work, "diff")
            git(work, "checkout", "-q", "--", ".")
            test_path = work / inst["test_file"]
            test_path.write_text(inst["tests"])
            git(work, "add", "-N", inst["test_file"])
            test_patch = git(work, "diff")
            git(work, "rm", "-q", "--cached", inst["test_file"])
            test_path.unlink()
            rows.append({
                "instance_id": inst["instance_id"],
                "repo": "lagoon/minicalc",
                "base_commit": base,
                "problem_statement": inst["problem_statement"],
                "patch": patch,
                "test_patch": test_patch,
                "created_at": inst["created_at"],
                "FAIL_TO_PASS": json.dumps(inst["fail_to_pass"]),
                "PASS_TO_PASS": json.dumps(
                    ["tests/test_ops.py::test_add", "tests/test_ops.py::test_add_negative", *inst.get("pass_to_pass_extra", [])]
                ),
                "version": "0.1",
            })
        subprocess.run(["git", "clone", "-q", "--bare", str(work), str(dest)], check=True, capture_output=True)
    return base, rows


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--jsonl":
        with tempfile.TemporaryDirectory() as tmp:
            _, rows = build(Path(tmp) / "minicalc.git")
        Path(argv[1]).write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        return 0
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    build(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
