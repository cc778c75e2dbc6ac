"""Kill -9 at random moments: `lagoon run` in a subprocess is killed, then resumed until it ends.

Every resume must finish (exit 0, submitted), the event log must have no gaps, no tool call may be
recorded twice, every intent must be closed by exactly one result or interruption report, and no
command may run twice (each appends a unique line to a log file in the repository).
"""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lagoon.agent.session import SessionStore

N_STEPS = 6
LAUNCH = "import sys; from lagoon.cli.app import main; sys.argv[0] = 'lagoon'; main()"


def _script(path: Path) -> None:
    steps: list[dict] = []
    for i in range(1, N_STEPS + 1):
        steps.append({"bash": f"sleep 0.15; echo step{i} >> ran.log"})
        if i == 3:
            steps.append({"tool": ["edit", {"command": "create", "path": "notes.txt", "file_text": "notes\n"}]})
        if i == 5:
            steps.append({"tool": ["view", {"path": "ran.log"}]})
    steps.append({"tool": ["submit", {"summary": "all steps ran"}]})
    path.write_text(json.dumps(steps))


def _launch(repo: Path, script: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-c", LAUNCH, "run", "crash task", "--repo", str(repo), "--json",
           "--model", f"scripted:{script}", "-c", "context.rerank=false"]
    tmp = repo.parent / "tmp"  # a killed run cannot remove its lagoon-env-* folder: keep it in the test's tmp
    tmp.mkdir(exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp)}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)


def _check_log(repo: Path) -> dict:
    store = SessionStore.for_workspace(repo)
    try:
        (session,) = store.list()
        events = list(store.events(session["id"]))
    finally:
        store.close()
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1)), "gap in the event log"
    assert events[0]["kind"] == "task"
    steps = [e["payload"]["step"] for e in events if e["kind"] == "model"]
    assert steps == list(range(1, len(steps) + 1)), "a model step was recorded twice or skipped"
    key = lambda e: (e["payload"]["step"], e["payload"]["call_id"])  # noqa: E731
    intents = Counter(key(e) for e in events if e["kind"] == "tool_intent")
    closes = Counter(key(e) for e in events if e["kind"] in ("tool_result", "tool_interrupted"))
    assert max(intents.values()) == 1, "a tool call was recorded twice"
    assert closes == intents, "an intent without exactly one result/interruption (or the reverse)"
    ran = (repo / "ran.log").read_text().split() if (repo / "ran.log").exists() else []
    assert len(ran) == len(set(ran)), f"a command ran twice: {ran}"
    commands = [e["payload"]["arguments"].get("command", "") for e in events if e["kind"] == "tool_intent"]
    for line in ran:
        assert any(f"echo {line} " in c for c in commands), f"{line} ran without an intent record"
    return {"events": events, "ran": ran}


def _kinds(repo: Path) -> list[str]:
    """The event kinds recorded so far (read-only, while the run may be writing)."""
    db = repo / ".lagoon" / "sessions.db"
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as conn:
            return [k for (k,) in conn.execute("SELECT kind FROM events ORDER BY seq")]
    except sqlite3.OperationalError:  # created but its tables not yet
        return []


def _trial(tmp_path: Path, rng: random.Random, kills: int) -> dict:
    repo = tmp_path / "repo"
    repo.mkdir(parents=True)
    (repo / "README.md").write_text("crash test repository\n")
    script = tmp_path / "script.json"
    _script(script)
    for _ in range(kills):
        proc = _launch(repo, script)
        before = _kinds(repo)
        started = before.count("model")
        while _kinds(repo).count("model") <= started:  # the run has started a (new) model step
            assert proc.poll() is None, f"the run ended before a step started: {proc.communicate()[1][-2000:]}"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.3))  # each later step sleeps 0.15 s: the run is mid-way here
        assert proc.poll() is None, "the run finished before the kill: the test would prove nothing"
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate()
        assert "exit" not in _kinds(repo), "the killed run recorded an end"
    final = _launch(repo, script)
    out, err = final.communicate(timeout=240)
    assert final.returncode == 0, err[-2000:]
    result = json.loads(out)
    assert result["submitted"] and result["exit_status"] == "submitted"
    checked = _check_log(repo)
    assert result["steps"] == sum(1 for e in checked["events"] if e["kind"] == "model")
    return {**checked, "result": result}


@pytest.mark.parametrize("seed", [1, 2])
def test_kill_minus_nine_then_resume_finishes_without_loss_or_repeats(tmp_path, seed):
    _trial(tmp_path, random.Random(seed), kills=1)


@pytest.mark.slow
def test_kill_minus_nine_twenty_trials(tmp_path):
    rng = random.Random(20)
    interrupted = 0
    for trial in range(20):
        out = _trial(tmp_path / f"t{trial}", rng, kills=rng.choice([1, 1, 2, 3]))
        interrupted += len(out["result"]["interrupted_steps"])
    # not an assertion on luck: just make the report show the crash points were exercised
    print(f"20 trials, {interrupted} commands interrupted mid-run and reported")
