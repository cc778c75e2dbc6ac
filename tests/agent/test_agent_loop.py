"""The loop end to end through the real tools: solving the sample repo, stale context, halts,
format errors, limits, resume after a crash, tool-state persistence, secrets."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from lagoon.agent import run_task
from lagoon.agent.runner import model_replies
from lagoon.agent.session import SessionStore, session_id_for
from lagoon.config import LagoonConfig, load_config
from lagoon.protocols import CommandResult
from lagoon.testing import FileHashSnapshots, ReplayChatModel, ScriptStep, WholeFileRetriever

HERE = Path(__file__).parent
# tests that pass no retriever get lagoon.context's real one; the neural rerank adds nothing here
CFG = load_config({"context": {"rerank": False}})
SAMPLE = HERE.parents[1] / "examples" / "sample-repo"


@pytest.fixture
def repo(tmp_path, monkeypatch):
    dst = tmp_path / "repo"
    shutil.copytree(SAMPLE, dst, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", ".lagoon"))
    # `python` in the scripted commands is this interpreter (it has pytest)
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the sample needs no plugins; starts faster
    return dst


def _events(repo: Path, sid: str) -> list[dict]:
    store = SessionStore.for_workspace(repo)
    try:
        return list(store.events(sid))
    finally:
        store.close()


def bash(cmd: str) -> ScriptStep:
    return ScriptStep(tool=("bash", {"command": cmd}))


SUBMIT = ScriptStep(tool=("submit", {"summary": "done"}))


def test_scripted_model_fixes_the_sample_repo_through_the_real_tools(repo):
    model = ReplayChatModel.from_file(str(HERE / "sample_solution.json"))
    result = run_task("fix the failing test", repo, LagoonConfig(), model=model,
                      retriever=WholeFileRetriever(repo), snapshot_manager=FileHashSnapshots(repo))
    assert result.submitted and result.exit_status == "submitted"
    assert result.steps == 5 and result.model_used == "scripted"
    assert [c["command"] for c in result.commands] == ["python -m pytest -q 2>&1 | tail -5", "python -m pytest -q"]
    assert result.commands[-1]["exit_code"] == 0
    check = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=repo, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
    # the model saw the failing test output and the retrieved code
    assert "test_median_even" in model.requests[1][-1].content
    assert "Relevant code" in model.requests[0][1].content
    doc = json.loads(Path(result.trajectory).read_text())
    assert doc["format_version"] == 1
    assert [e["seq"] for e in doc["events"]] == list(range(1, len(doc["events"]) + 1))
    d = result.to_dict()
    for key in ("format_version", "success", "submitted", "exit_status", "model_used", "latency_ms",
                "validation_passed", "steps", "input_tokens", "output_tokens", "cost_usd", "commands",
                "validation_failures", "backends", "session_id", "trajectory"):
        assert key in d
    # the failing test was new evidence (v2); the editor's change broke two assumptions — the test
    # no longer fails, textstats.py is not as read — so the agent re-retrieved before the next step
    assert result.context_version == 3 and result.validation_failures == 1 and result.assumption_drift == 2


def test_file_changed_behind_the_agents_back_forces_reretrieval_and_a_new_version(repo):
    target = repo / "textstats.py"

    def tamper(messages):
        target.write_text(target.read_text() + "\n\ndef mode(values):\n    return max(set(values), key=values.count)\n")
        return bash("echo tampered")

    retriever = WholeFileRetriever(repo)
    model = ReplayChatModel([bash("echo one"), tamper, bash("echo three"), SUBMIT])
    result = run_task("median textstats", repo, LagoonConfig(), model=model, retriever=retriever,
                      snapshot_manager=FileHashSnapshots(repo))
    assert result.submitted
    events = _events(repo, result.session_id)
    failed = [e["payload"] for e in events if e["kind"] == "validation" and not e["payload"]["ok"]]
    assert len(failed) == 1 and failed[0]["reasons"][0].startswith("source_changed: file:textstats.py")
    versions = [e["payload"]["version"] for e in events if e["kind"] == "context"]
    assert versions == [1, 2]
    assert retriever.calls == 2
    # the step after the change was prompted with the re-retrieved code, not the stale copy
    assert "def mode" in model.requests[2][1].content
    assert "def mode" not in model.requests[1][1].content


@pytest.mark.parametrize("limit", [1, 3])
def test_repeated_validation_failures_halt_before_any_model_call(repo, limit):
    cfg = load_config({"validation": {"max_consecutive_validation_failures": limit}})
    model = ReplayChatModel([SUBMIT])
    result = run_task("fix it", repo, cfg, model=model, retriever=WholeFileRetriever(repo),
                      snapshot_manager=FileHashSnapshots(repo, always_fail=True))
    assert result.exit_status == "validation_halt" and not result.submitted
    assert result.validation_failures == limit and not result.validation_passed
    assert "unverified" in result.exit_message and model.requests == []


def test_real_context_package_halts_when_every_snapshot_is_stale(repo):
    # staleness_threshold_ms=0: every snapshot is stale by the time it is validated, re-retrieval
    # cannot help, and the gate must halt (never take its fast path on a stale snapshot)
    cfg = load_config({"context": {"rerank": False, "staleness_threshold_ms": 0},
                       "validation": {"max_consecutive_validation_failures": 2}})
    model = ReplayChatModel([SUBMIT])
    result = run_task("median textstats", repo, cfg, model=model)
    assert result.exit_status == "validation_halt" and model.requests == []
    assert result.validation_failures == 2 and "stale" in result.exit_message
    events = _events(repo, result.session_id)
    assert [e["payload"]["version"] for e in events if e["kind"] == "context"] == [1, 2]


def test_format_errors_are_bounded_and_a_valid_reply_resets_the_count(repo):
    cfg = load_config({"context": {"rerank": False}, "agent": {"max_format_errors": 2}})
    model = ReplayChatModel(["I think", "```bash\necho ok\n```", "hmm", "```\nsubmit\n```"])
    result = run_task("t1", repo, cfg, model=model)
    assert result.submitted and result.commands == [{"command": "echo ok", "exit_code": 0}]
    assert "fenced block" in model.requests[1][-1].content  # the model was told what to send
    bad = ReplayChatModel(["no", "still no", "never"])
    result = run_task("t2", repo, cfg, model=bad)
    assert result.exit_status == "format_error" and result.steps == 2 and "2 malformed" in result.exit_message


def test_unknown_tool_is_a_format_error(repo):
    model = ReplayChatModel([ScriptStep(tool=("rm_everything", {})), SUBMIT])
    result = run_task("t", repo, CFG, model=model)
    assert result.submitted
    assert any(e["kind"] == "format_error" and "rm_everything" in e["payload"]["error"]
               for e in _events(repo, result.session_id))


def test_step_limit(repo):
    model = ReplayChatModel([bash("true")], repeat_last=True)
    result = run_task("loop forever", repo, load_config({"context": {"rerank": False}}, "agent.step_limit=3"), model=model)
    assert result.exit_status == "limits_exceeded" and result.steps == 3 and len(result.commands) == 3


class CrashingEnvironment:
    """Runs commands locally but dies (like a kill) the first time it sees `crash_on`."""

    def __init__(self, inner, crash_on: str) -> None:
        self.inner, self.root, self.crash_on, self.seen = inner, inner.root, crash_on, []

    def execute(self, command: str, *, timeout_s: float | None = None) -> CommandResult:
        self.seen.append(command)
        if command == self.crash_on and self.seen.count(command) == 1:
            raise KeyboardInterrupt
        return self.inner.execute(command, timeout_s=timeout_s)

    def state(self):
        return self.inner.state()

    def restore(self, state):
        self.inner.restore(state)


def test_crash_mid_command_is_reported_on_resume_and_never_rerun(repo):
    from lagoon.agent import LocalEnvironment

    env = CrashingEnvironment(LocalEnvironment(repo), "touch boom")
    script = [bash("echo first"), bash("touch boom"), bash("ls boom || echo missing"), SUBMIT]
    with pytest.raises(KeyboardInterrupt):
        run_task("crash me", repo, CFG, model=ReplayChatModel(script), environment=env)
    done = model_replies(repo, CFG, session_id_for(repo, "crash me"))
    assert done == 2  # `echo first`, then `touch boom` (its command was cut short)
    model = ReplayChatModel(script, start=done)
    result = run_task("crash me", repo, CFG, model=model, environment=env)
    assert result.submitted and result.resumed
    assert env.seen.count("touch boom") == 1, "the interrupted command was re-run"
    assert result.interrupted_steps == [{"step": 2, "name": "bash", "arguments": {"command": "touch boom"}}]
    assert "interrupted" in model.requests[0][-1].content
    events = _events(repo, result.session_id)
    intents = [(e["payload"]["step"], e["payload"]["call_id"]) for e in events if e["kind"] == "tool_intent"]
    closed = [(e["payload"]["step"], e["payload"]["call_id"]) for e in events
              if e["kind"] in ("tool_result", "tool_interrupted")]
    assert sorted(intents) == sorted(closed) and len(set(intents)) == len(intents)
    # a finished session is not run again
    again = run_task("crash me", repo, CFG, model=ReplayChatModel([]))
    assert again.submitted and again.steps == result.steps


@pytest.mark.parametrize("persist", [True, False])
def test_tool_state_persistence_controls_whether_cwd_and_env_resume(repo, persist):
    (repo / "sub").mkdir()
    crashed = {"done": False}

    def crash_once(messages):
        if not crashed["done"]:
            crashed["done"] = True
            raise KeyboardInterrupt
        return bash('pwd; echo "foo=$FOO"')

    cfg = load_config({"context": {"rerank": False},
                       "model_deployment": {"inference": {"tool_state_persistence": persist}}})
    script = [bash("cd sub && export FOO=bar"), crash_once, SUBMIT]
    with pytest.raises(KeyboardInterrupt):
        run_task("state", repo, cfg, model=ReplayChatModel(script))
    done = model_replies(repo, cfg, session_id_for(repo, "state"))
    result = run_task("state", repo, cfg, model=ReplayChatModel(script, start=done))
    assert result.submitted
    out = [e["payload"]["text"] for e in _events(repo, result.session_id) if e["kind"] == "tool_result"][1]
    if persist:
        assert out.startswith(str((repo / "sub").resolve())) and "foo=bar" in out
    else:
        assert out.startswith(str(repo.resolve()) + "\n") and "foo=\n" in out


def test_no_secret_in_the_session_database_or_trajectory(repo, monkeypatch):
    secret = "sk-lagoon-test-secret-0123456789"
    monkeypatch.setenv("FAKE_PROVIDER_API_KEY", secret)
    model = ReplayChatModel([bash("env; echo key=$FAKE_PROVIDER_API_KEY"),
                             bash(f"echo {secret} > leaked.txt; cat leaked.txt"), SUBMIT])
    result = run_task(f"do not store {secret}", repo, CFG, model=model)
    assert result.submitted
    for path in [*(repo / ".lagoon").glob("sessions.db*"), *(repo / ".lagoon").rglob("*.json")]:
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
    db = sqlite3.connect(repo / ".lagoon" / "sessions.db")
    dump = "\n".join(db.iterdump())
    assert secret not in dump and "[REDACTED:FAKE_PROVIDER_API_KEY]" in dump
    # commands never even saw the variable
    assert "FAKE_PROVIDER_API_KEY" not in model.requests[1][-1].content.split("key=")[0]


def test_router_over_scripted_backends(repo):
    from lagoon.routing import build_router

    cfg = CFG
    cheap = ReplayChatModel([bash("echo routed"), SUBMIT], name="cheap")
    strong = ReplayChatModel([bash("echo strong"), SUBMIT], name="strong")
    router = build_router(cfg, backends={"retrieval_bound": cheap.inner, "reasoning_bound": strong.inner})
    result = run_task("fix the failing test", repo, cfg, model=router)
    assert result.submitted and result.steps == 2
    # "fix … test" is retrieval-bound by the lexical rule: the cheap backend answered both steps
    assert result.backends == {"retrieval_bound": 2} and result.model_used == "cheap"
    assert strong.requests == []


def test_real_context_package_revalidates_a_file_changed_behind_the_agent(repo):
    pytest.importorskip("lagoon.context")
    test_file = repo / "tests" / "test_textstats.py"

    def tamper(messages):
        test_file.write_text(test_file.read_text() + "\n\ndef test_mean_single():\n    assert mean([5]) == 5\n")
        return bash("echo changed")

    model = ReplayChatModel([tamper, bash("echo next"), SUBMIT])
    result = run_task("fix the failing test test_median_even", repo, CFG, model=model)
    assert result.submitted
    events = _events(repo, result.session_id)
    failed = [e["payload"] for e in events if e["kind"] == "validation" and not e["payload"]["ok"]]
    assert len(failed) == 1 and failed[0]["reasons"][0].startswith("source_changed")
    assert result.context_version == 2 and result.validation_passed
    refresh = [e["payload"] for e in events if e["kind"] == "context"][-1]
    assert refresh["version"] == 2 and refresh["reasons"][0].startswith("source_changed") and refresh["chunks"]


class PricedModel:
    """Wraps a model and charges `price` USD per call (to drive agent.cost_limit)."""

    def __init__(self, inner, price: float) -> None:
        self.inner, self.price, self.name = inner, price, "priced"

    @property
    def context_window(self) -> int:
        return self.inner.context_window

    def count_tokens(self, messages):
        return self.inner.count_tokens(messages)

    def chat(self, messages, **kw):
        from dataclasses import replace

        reply = self.inner.chat(messages, **kw)
        return replace(reply, usage=replace(reply.usage, cost_usd=self.price))


def test_agent_section_keys_take_effect(repo):
    def cfg(**agent):
        return load_config({"context": {"rerank": False}, "agent": agent})

    r = run_task("cost", repo, cfg(cost_limit=1.5), model=PricedModel(ReplayChatModel([bash("true")], repeat_last=True), 1.0))
    assert r.exit_status == "limits_exceeded" and "cost" in r.exit_message and r.steps == 2 and r.cost_usd == 2.0
    r = run_task("time", repo, cfg(time_limit_s=0.3), model=ReplayChatModel([bash("sleep 0.4")], repeat_last=True))
    assert r.exit_status == "limits_exceeded" and "time limit" in r.exit_message and r.steps == 1
    r = run_task("timeout", repo, cfg(command_timeout_s=0.5), model=ReplayChatModel([bash("sleep 20"), SUBMIT]))
    assert r.submitted and r.commands == [{"command": "sleep 20", "exit_code": -9}]
    model = ReplayChatModel([bash("seq 1 20000"), SUBMIT])
    r = run_task("output", repo, cfg(max_output_chars=500), model=model)
    shown = model.requests[1][-1].content
    assert "characters cut" in shown and len(shown) < 700
    r = run_task("state dir", repo, cfg(state_dir="agent-state"), model=ReplayChatModel([SUBMIT]))
    assert (repo / "agent-state" / "sessions.db").exists() and "agent-state/trajectories" in r.trajectory


def test_agent_state_dir_holds_index_snapshots_and_sessions_and_is_never_indexed(repo):
    from lagoon.context.fileset import FileSet

    cfg = load_config({"context": {"rerank": False}, "agent": {"state_dir": "agent-state"}})
    run_task("first run", repo, cfg, model=ReplayChatModel([SUBMIT]))
    r = run_task("show the trajectories and sessions of the first run", repo, cfg, model=ReplayChatModel([SUBMIT]))
    state = repo / "agent-state"
    assert (state / "index").is_dir() and (state / "context.sqlite").is_file() and (state / "sessions.db").is_file()
    assert not (repo / ".lagoon").exists(), "a component still hard-codes .lagoon"
    assert (state / "trajectories").is_dir()
    assert not any(p.startswith("agent-state/") for p in FileSet(repo, cfg.context, state_dir="agent-state").scan())
    events = json.loads(Path(r.trajectory).read_text())["events"]
    chunks = [c for e in events if e["kind"] == "context" for c in e["payload"]["chunks"]]
    assert chunks and not any(c.startswith("agent-state/") for c in chunks)


def test_context_budget_caps_every_prompt_the_model_sees(repo):
    for strategy in ("semantic_importance", "fifo"):
        cfg = load_config({"context": {"rerank": False}, "agent": {"summaries": "extractive"},
                           "model_deployment": {"memory": {"context_budget": 900, "truncation_strategy": strategy}}})
        model = ReplayChatModel([bash(f"seq {i} {i + 150}") for i in range(12)] + [SUBMIT])
        r = run_task(f"budget {strategy}", repo, cfg, model=model)
        assert r.submitted
        assert max(model.count_tokens(req) for req in model.requests) <= 900
        assert "Earlier steps (summarised)" in model.requests[-1][1].content
        # agent.summaries=extractive: no summary request reached the model, and the log says so
        assert len(model.requests) == r.steps and set(r.summaries) == {"extractive"}


def test_telemetry_counts_steps_tool_calls_and_validation_failures(repo):
    from lagoon.telemetry import Telemetry

    tel = Telemetry()
    target = repo / "textstats.py"

    def tamper(messages):
        target.write_text(target.read_text() + "\n# changed\n")
        return bash("echo changed")

    model = ReplayChatModel([tamper, bash("false"), SUBMIT])
    result = run_task("median textstats", repo, CFG, model=model, telemetry=tel,
                      retriever=WholeFileRetriever(repo), snapshot_manager=FileHashSnapshots(repo))
    assert result.submitted
    assert tel.value("lagoon_agent_steps_total") == 3
    assert tel.value("lagoon_agent_tool_calls_total", {"tool": "bash", "ok": "false"}) == 1
    assert tel.value("lagoon_agent_validation_failures_total") == 1
    assert tel.value("lagoon_agent_context_version") == 2
    assert b"lagoon_agent_step_overhead_seconds" in tel.prometheus_text()


def test_agent_tools_key_limits_the_offered_tools(repo):
    cfg = load_config({"context": {"rerank": False}, "agent": {"tools": ["bash"]}})
    model = ReplayChatModel([ScriptStep(tool=("view", {"path": "README.md"})), SUBMIT])
    r = run_task("only bash", repo, cfg, model=model)
    system = model.requests[0][0].content
    assert "Tools: bash, submit." in system and "view shows" not in system
    assert r.submitted and "view" in model.requests[1][-1].content  # the refused call is explained
    from lagoon.errors import ConfigError

    with pytest.raises(ConfigError, match="agent.tools"):
        load_config({"agent": {"tools": ["bash", "rm"]}})
