"""agent.mode=coordinated: retriever → coder → verifier with typed contracts, the verifier sending the
coder back, a version per hop, contract breaches, and kill -9 mid-hop through `lagoon run`."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from lagoon.agent.contracts import ContractError, parse_output
from lagoon.agent.coordinator import ROLE_TOOLS, coordinated_session_id, run_coordinated
from lagoon.agent.session import SessionStore
from lagoon.config import load_config
from lagoon.testing import ReplayChatModel

HERE = Path(__file__).parent
SCRIPTS = HERE / "coordinated"
SAMPLE = HERE.parents[1] / "examples" / "sample-repo"
CFG = load_config({"context": {"rerank": False}, "agent": {"mode": "coordinated"}})
TASK = "fix the failing median test"


@pytest.fixture
def repo(tmp_path, monkeypatch):
    dst = tmp_path / "repo"
    shutil.copytree(SAMPLE, dst, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", ".lagoon"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return dst


def models(folder: Path = SCRIPTS):
    seen: dict[str, list] = {}

    def make(role, replies_so_far):
        m = ReplayChatModel.from_file(str(folder / f"{role}.json"), start=replies_so_far, name=role)
        seen.setdefault(role, []).append(m)
        return m

    make.seen = seen
    return make


def _export(repo: Path, sid: str) -> dict:
    store = SessionStore.for_workspace(repo)
    try:
        return store.export(sid)
    finally:
        store.close()


def test_coordinated_roles_solve_the_sample_with_a_send_back_and_a_version_per_hop(repo):
    m = models()
    result = run_coordinated(TASK, repo, CFG, models=m)
    assert result.submitted, result.exit_message
    check = subprocess.run([sys.executable, "-m", "pytest", "-q"], cwd=repo, capture_output=True, text=True)
    assert check.returncode == 0
    doc = _export(repo, result.session_id)
    hops = [(e["payload"]["role"], e["payload"]["round"], e["payload"]["version"])
            for e in doc["events"] if e["kind"] == "hop_result"]
    assert hops == [("retriever", 1, 2), ("coder", 1, 3), ("verifier", 1, 4), ("coder", 2, 5), ("verifier", 2, 6)]
    assert result.context_version == 6 and [s["version"] for s in doc["snapshots"]] == [1, 2, 3, 4, 5, 6]
    # the verifier's findings reached the coder's second round, through its input contract
    second = next(e["payload"] for e in doc["events"] if e["kind"] == "hop" and e["payload"]["round"] == 2
                  and e["payload"]["role"] == "coder")
    assert second["input"]["findings"] == ["test_median_even fails: 3.5 != 2.5"] and second["input"]["round"] == 2
    assert second["input"]["files"] == ["textstats.py"]
    # every role saw only its tools, and its input contract in the prompt
    for role, ms in m.seen.items():
        first = ms[0].requests[0]
        assert f"You are the {role}" in first[1].content and '"version"' in first[1].content
    # the trajectory file holds the hops with their contracts
    traj = json.loads(Path(result.trajectory).read_text())
    assert [h["role"] for h in traj["hops"]] == ["retriever", "coder", "verifier", "coder", "verifier"]
    assert traj["hops"][2]["output"]["passed"] is False and traj["hops"][4]["output"]["passed"] is True
    assert set(ROLE_TOOLS["verifier"]) == {"bash", "view"}
    # a finished run is not run again
    again = run_coordinated(TASK, repo, CFG, models=models())
    assert again.submitted and again.steps == result.steps


def test_a_contract_breach_ends_the_run_naming_the_role_and_field(repo, tmp_path):
    folder = tmp_path / "bad"
    shutil.copytree(SCRIPTS, folder)
    (folder / "retriever.json").write_text(json.dumps([{"tool": ["submit", {"summary": '{"files": []}'}]}]))
    result = run_coordinated(TASK, repo, CFG, models=models(folder))
    assert result.exit_status == "contract_violation" and not result.submitted
    assert "retriever" in result.exit_message and "RetrieverOutput at files" in result.exit_message
    with pytest.raises(ContractError, match="no JSON object"):
        parse_output("verifier", "submitted: looks fine to me")
    with pytest.raises(ContractError, match="at mood: Extra inputs"):
        parse_output("coder", '{"summary": "x", "files_changed": [], "mood": "great"}')


LAUNCH = "import sys; from lagoon.cli.app import main; sys.argv[0] = 'lagoon'; main()"


def test_kill_9_mid_hop_resumes_without_losing_or_repeating_a_tool_step(repo, tmp_path):
    folder = tmp_path / "scripts"
    shutil.copytree(SCRIPTS, folder)
    coder = json.loads((folder / "coder.json").read_text())
    coder[3] = {"bash": "echo coder-step >> ran.log; sleep 30"}  # round 2's command: killed while it runs
    (folder / "coder.json").write_text(json.dumps(coder))
    cmd = [sys.executable, "-c", LAUNCH, "run", TASK, "--repo", str(repo), "--json", "--model", f"scripted:{folder}",
           "-c", "context.rerank=false", "-c", "agent.mode=coordinated"]
    # the killed run cannot remove its lagoon-env-* folder: keep it in the test's tmp
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TMPDIR": str(tmp_path)}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    deadline = time.time() + 240
    while not (repo / "ran.log").exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)  # kill -9 while round 2 of the coder runs its command
    proc.wait()
    sid = coordinated_session_id(repo.resolve(), TASK)
    # `sessions resume` finds the mode in the session: no -c agent.mode needed
    resume = [sys.executable, "-c", LAUNCH, "sessions", "resume", sid, "--repo", str(repo), "--json",
              "--model", f"scripted:{folder}", "-c", "context.rerank=false"]
    out = subprocess.run(resume, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout)
    assert result["submitted"] and result["interrupted_steps"]
    assert (repo / "ran.log").read_text().split() == ["coder-step"]  # the cut command was not re-run
    doc = _export(repo, sid)
    hops = [(e["payload"]["role"], e["payload"]["round"]) for e in doc["events"] if e["kind"] == "hop_result"]
    assert hops == [("retriever", 1), ("coder", 1), ("verifier", 1), ("coder", 2), ("verifier", 2)]
    assert Counter(e["kind"] for e in doc["events"])["hop"] == 5  # the cut hop was not started twice
    coder2 = _export(repo, f"{sid}.coder.2")["events"]
    key = lambda e: (e["payload"]["step"], e["payload"]["call_id"])  # noqa: E731
    intents = Counter(key(e) for e in coder2 if e["kind"] == "tool_intent")
    assert max(intents.values()) == 1
    assert [e["kind"] for e in coder2].count("tool_interrupted") == 1


def test_coordinator_rounds_bound_the_send_backs(repo):
    cfg = load_config({"context": {"rerank": False}, "agent": {"mode": "coordinated", "coordinator_rounds": 1}})
    result = run_coordinated(TASK, repo, cfg, models=models())
    assert result.exit_status == "verification_failed" and not result.submitted
    assert "agent.coordinator_rounds=1" in result.exit_message and "test_median_even fails" in result.exit_message
