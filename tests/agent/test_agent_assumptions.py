"""Assumptions live in a real run (scripted model, real tools, real lagoon.context): derived ones
drift when a command edits what they depend on, the model's own are checked before every step and
halt the run when they keep failing, the limits in config take effect, and the session export
shows every snapshot with its assumptions and why it was taken."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from lagoon.agent import run_task
from lagoon.agent.assumptions import AssumptionBook
from lagoon.agent.session import SessionStore
from lagoon.config import load_config
from lagoon.testing import ReplayChatModel, ScriptStep

SAMPLE = Path(__file__).parents[2] / "examples" / "sample-repo"


def cfg(**sections):
    return load_config({"context": {"rerank": False, **sections.pop("context", {})}, **sections})


@pytest.fixture
def repo(tmp_path, monkeypatch):
    dst = tmp_path / "repo"
    shutil.copytree(SAMPLE, dst, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", ".lagoon"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return dst


def bash(cmd: str) -> ScriptStep:
    return ScriptStep(tool=("bash", {"command": cmd}))


def assume(name: str, check: str, claim: str = "", **kw) -> ScriptStep:
    return ScriptStep(tool=("assume", {"name": name, "claim": claim or name, "check": check, **kw}))


SUBMIT = ScriptStep(tool=("submit", {"summary": "done"}))


def _export(repo: Path, sid: str, state_dir: str = ".lagoon") -> dict:
    store = SessionStore.for_workspace(repo, state_dir)
    try:
        return store.export(sid)
    finally:
        store.close()


def test_a_command_editing_a_file_an_assumption_rests_on_is_drift_and_a_new_version(repo):
    model = ReplayChatModel([bash("echo looking"), bash("sed -i 's/return/return  /' textstats.py"),
                             bash("echo after"), SUBMIT])
    result = run_task("median textstats mean", repo, cfg(), model=model)
    assert result.submitted and result.assumption_drift >= 1
    doc = _export(repo, result.session_id)
    kinds = [e["kind"] for e in doc["events"]]
    # the sed ran in step 2; before step 3's model call the check failed, drift was recorded and
    # the context refreshed — all between the sed's result and the third model event
    sed_result = max(i for i, e in enumerate(doc["events"]) if e["kind"] == "tool_result" and e["payload"]["step"] == 2)
    third_call = [i for i, k in enumerate(kinds) if k == "model"][2]
    between = doc["events"][sed_result + 1:third_call]
    drift = [e["payload"] for e in between if e["kind"] == "assumption"]
    assert any(d["name"] == "file:textstats.py" and d["was"] is True and d["holds"] is False for d in drift)
    assert drift[0]["check"].startswith("content_hash(textstats.py) == ")
    failed = [e["payload"] for e in between if e["kind"] == "validation" and not e["payload"]["ok"]]
    assert failed and "file:textstats.py" in failed[0]["reasons"][0]
    refreshed = [e["payload"] for e in between if e["kind"] == "context"]
    assert len(refreshed) == 1 and refreshed[0]["version"] == failed[0]["version"] + 1
    # the third call was prompted with the edited file, not the copy read before the sed
    assert "return  " in model.requests[2][1].content and "return  " not in model.requests[1][1].content
    # the export has every snapshot: version, why it was taken, its assumptions (claim, check, result, when)
    snaps = doc["snapshots"]
    assert [s["version"] for s in snaps] == list(range(1, result.context_version + 1))
    assert snaps[0]["reason"] == "initial" and "file:textstats.py" in snaps[-1]["reason"]
    first = {a["name"]: a for a in snaps[0]["assumptions"]}
    a = first["file:textstats.py"]
    assert a["claim"] == "textstats.py is as it was read" and a["holds"] is True and a["checked_at"] > 0
    assert len(snaps[0]["assumptions"]) <= 5  # context.max_assumptions_per_snapshot


@pytest.mark.parametrize("limit", [1, 2])
def test_a_failing_model_assumption_halts_after_the_configured_failures_naming_it(repo, limit):
    (repo / "NOTES.md").write_text("release notes\n")
    model = ReplayChatModel([assume("notes_exist", "test -f NOTES.md", "the repo has release notes"),
                             bash("rm NOTES.md"), SUBMIT])
    result = run_task("median", repo, cfg(validation={"max_consecutive_validation_failures": limit}), model=model)
    assert result.exit_status == "validation_halt" and not result.submitted
    assert result.validation_failures == limit and len(model.requests) == 2  # no call after the rm
    assert "notes_exist" in result.exit_message and "test -f NOTES.md" in result.exit_message
    assert "the repo has release notes" in result.exit_message
    assert f"max_consecutive_validation_failures={limit}" in result.exit_message


def test_an_assumption_that_does_not_hold_is_refused_when_declared(repo):
    model = ReplayChatModel([assume("notes_exist", "test -f NOTES.md"), assume("garbage", "test_empty"), SUBMIT])
    result = run_task("median", repo, cfg(), model=model)
    assert result.submitted and result.validation_failures == 0
    doc = _export(repo, result.session_id)
    refused = [e["payload"] for e in doc["events"] if e["kind"] == "tool_result" and e["payload"]["name"] == "assume"]
    assert all(not r["ok"] and r["text"].startswith("not declared") for r in refused)
    assert "exit 127" in refused[1]["text"]  # a check that cannot run says why
    assert not any(a["source"] == "model" for s in doc["snapshots"] for a in s["assumptions"])


def test_reject_unverified_assumptions_off_records_the_drift_and_carries_on(repo):
    (repo / "NOTES.md").write_text("release notes\n")
    model = ReplayChatModel([assume("notes_exist", "test -f NOTES.md"), bash("rm NOTES.md"), bash("echo go on"),
                             SUBMIT])
    result = run_task("median", repo, cfg(validation={"reject_unverified_assumptions": False}), model=model)
    assert result.submitted and result.validation_failures == 0
    doc = _export(repo, result.session_id)
    snap = doc["snapshots"][-1]
    assert snap["reason"].startswith("assumptions_changed: notes_exist")
    (mine,) = [a for a in snap["assumptions"] if a["name"] == "notes_exist"]
    assert mine["holds"] is False and mine["check"] == "test -f NOTES.md" and mine["source"] == "model"
    assert "[FAILED] notes_exist" in model.requests[2][1].content  # the model is told


def test_a_model_assumption_that_starts_failing_is_caught_before_the_next_call(repo):
    model = ReplayChatModel([
        assume("mean_not_stubbed", "! grep -q 'return 0' textstats.py", watch=["textstats.py"]),
        bash("printf 'def mean(values):\\n    return 0\\n' >> textstats.py"),
        SUBMIT,
    ])
    result = run_task("mean", repo, cfg(validation={"max_consecutive_validation_failures": 2}), model=model)
    assert result.exit_status == "validation_halt" and len(model.requests) == 2
    drift = [e["payload"] for e in _export(repo, result.session_id)["events"] if e["kind"] == "assumption"]
    assert any(d["name"] == "mean_not_stubbed" and d["was"] is True and d["holds"] is False for d in drift)


def test_max_assumptions_per_snapshot_caps_the_model_and_the_derived(repo):
    model = ReplayChatModel([assume("a", "true"), assume("b", "true"), SUBMIT])
    result = run_task("median textstats", repo, cfg(context={"max_assumptions_per_snapshot": 1}), model=model)
    assert result.submitted
    doc = _export(repo, result.session_id)
    refused = [e["payload"] for e in doc["events"] if e["kind"] == "tool_result" and e["payload"]["name"] == "assume"][1]
    assert not refused["ok"] and "context.max_assumptions_per_snapshot" in refused["text"]
    assert all(len(s["assumptions"]) <= 1 for s in doc["snapshots"])
    assert [a["name"] for a in doc["snapshots"][-1]["assumptions"]] == ["a"]
    # the default cap keeps more: the derived ones fill it
    other = run_task("median textstats again", repo, cfg(), model=ReplayChatModel([SUBMIT]))
    assert len(_export(repo, other.session_id)["snapshots"][0]["assumptions"]) > 1


def test_consumed_chunks_past_their_ttl_are_retrieved_again(repo):
    steps = [bash("echo 1"), bash("echo 2"), SUBMIT]
    r = run_task("median", repo, cfg(context={"chunk_ttl_s": 0.0}), model=ReplayChatModel(steps))
    reasons = [s["reason"] for s in _export(repo, r.session_id)["snapshots"]]
    assert r.submitted and len(reasons) == 4 and all(x.startswith("chunk_ttl") for x in reasons[1:])  # before each call
    r = run_task("median again", repo, cfg(), model=ReplayChatModel(steps))
    assert [s["reason"] for s in _export(repo, r.session_id)["snapshots"]] == ["initial"]


def test_checks_rerun_only_when_their_files_change(tmp_path):
    import time

    (tmp_path / "a.txt").write_text("x")

    class Env:
        root = tmp_path
        runs = 0

        def execute(self, command, *, timeout_s=None):
            import subprocess

            from lagoon.protocols import CommandResult

            Env.runs += 1
            p = subprocess.run(["bash", "-c", command], capture_output=True, text=True)
            return CommandResult(command, p.returncode, p.stdout + p.stderr)

    # checks dated 10 s on: the file is past the racy window (a stat written within it is not trusted)
    book = AssumptionBook(tmp_path, environment=Env(), clock=lambda: time.time() + 10)
    book.declare("has_x", "a.txt holds x", "grep -q x a.txt", watch=["a.txt"])
    book.declare("anything", "true", "true")
    assert Env.runs == 2
    for _ in range(5):
        assert book.refresh() == []
    assert Env.runs == 2  # nothing changed: no check re-ran
    book.touch()  # a command ran: the no-watch check is due, the watched one is not
    assert book.refresh() == [] and Env.runs == 3
    (tmp_path / "a.txt").write_text("y")
    (drift,) = book.refresh()
    assert drift.name == "has_x" and drift.was is True and drift.assumption.holds is False and Env.runs == 4


def test_a_failing_test_run_re_retrieves_the_code_under_test(repo):
    # the task names no code: the first retrieval cannot find median(); the failing run's evidence can
    model = ReplayChatModel([bash("python -m pytest -q 2>&1 | tail -5"), bash("echo next"), SUBMIT])
    result = run_task("fix the failing test", repo, cfg(), model=model)
    assert result.submitted
    snaps = _export(repo, result.session_id)["snapshots"]
    assert snaps[1]["reason"].startswith("new_evidence: test tests/test_textstats.py::test_median_even failed")
    assert not any(c.startswith("textstats.py") for c in snaps[0]["chunks"])
    assert any(c.startswith("textstats.py") for c in snaps[1]["chunks"])
    assert "def median" in model.requests[1][1].content and "def median" not in model.requests[0][1].content
    # and the failure became an assumption of the new snapshot: the test fails
    fails = [a for a in snaps[1]["assumptions"] if a["kind"] == "test_fails"]
    assert fails[0]["claim"] == "tests/test_textstats.py::test_median_even fails"


def test_derived_dependencies_and_the_room_left_by_the_cap(tmp_path, monkeypatch):
    from lagoon.agent.environment import LocalEnvironment
    from lagoon.testing import FileChunk

    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    (tmp_path / "mod.py").write_text("import os\nimport pytest\nimport mod2\n\ndef f():\n    return pytest\n")
    (tmp_path / "mod2.py").write_text("X = 1\n")
    chunk = FileChunk("mod.py", 1, 6, "f", (tmp_path / "mod.py").read_text())
    env = LocalEnvironment(tmp_path)
    try:
        book = AssumptionBook(tmp_path, environment=env, file_hash=lambda p: "h")
        book.derive([chunk])
        dep = book.derived["dependency:pytest"]  # not os (stdlib), not mod2 (the repo's own)
        assert [a.kind for a in book.derived.values()] == ["file_hash", "dependency", "symbol"]
        import pytest as installed

        assert dep.claim == f"pytest is installed at {installed.__version__} (imported as pytest)"
        assert book.verify("dependency:pytest").assumption.holds is True
        book.derive([chunk], room=1)
        assert list(book.derived) == ["file:mod.py"]
    finally:
        env.close()


def test_a_modified_files_consumed_chunks_are_invalidated_at_once(repo):
    import sqlite3

    model = ReplayChatModel([bash("sed -i 's/return/return  /' textstats.py"), SUBMIT])
    assert run_task("median textstats mean", repo, cfg(), model=model).submitted
    db = sqlite3.connect(repo / ".lagoon" / "context.sqlite")
    rows = db.execute("SELECT invalidated_at FROM consumed WHERE path = 'textstats.py'").fetchall()
    db.close()
    assert rows and any(r[0] is not None for r in rows)  # the chunks read before the sed


def test_a_resumed_run_keeps_the_models_assumptions_and_the_evidence(repo):
    from lagoon.agent.runner import model_replies

    script = [assume("readme_there", "test -f README.md"), bash("python -m pytest -q 2>&1 | tail -5")]
    with pytest.raises(IndexError):  # the script runs out: the process "dies" mid-run
        run_task("fix the failing test", repo, cfg(), model=ReplayChatModel(script))
    from lagoon.agent.session import session_id_for

    sid = session_id_for(repo.resolve(), "fix the failing test")
    done = model_replies(repo, cfg(), sid)
    resumed = run_task("fix the failing test", repo, cfg(), model=ReplayChatModel([*script, SUBMIT], start=done))
    assert resumed.submitted and resumed.resumed
    snap = _export(repo, sid)["snapshots"][-1]
    assert snap["reason"] == "resumed"
    names = [a["name"] for a in snap["assumptions"]]
    assert "readme_there" in names and "fails:tests/test_textstats.py::test_median_even" in names
    assert any(c.startswith("textstats.py") for c in snap["chunks"])  # the evidence survived the crash


def test_verify_is_offered_once_there_is_an_assumption_to_verify(repo):
    offered: list[list[str]] = []

    class Recording(ReplayChatModel):
        def chat(self, messages, **kw):
            offered.append([t.name for t in kw.get("tools", ())])
            return super().chat(messages, **kw)

    model = Recording([assume("readme_there", "test -f README.md"), ScriptStep(tool=("verify", {})), SUBMIT])
    assert run_task("median", repo, cfg(), model=model).submitted
    assert "assume" in offered[0] and "verify" not in offered[0]
    assert "verify" in offered[1] and "verify" in offered[2]
