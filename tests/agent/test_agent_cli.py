"""`lagoon run` and `lagoon sessions …` through the CLI (CliRunner), incl. the router over loopback servers."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lagoon.cli.app import app

runner = CliRunner()


@pytest.fixture
def repo(tmp_path):
    (tmp_path / "repo").mkdir()
    (tmp_path / "repo" / "a.txt").write_text("alpha\n")
    return tmp_path / "repo"


def test_run_then_sessions_list_show_export_resume(repo, tmp_path):
    script = tmp_path / "s.json"
    script.write_text(json.dumps([{"bash": "cat a.txt"}, {"tool": ["submit", {"summary": "read it"}]}]))
    res = runner.invoke(app, ["run", "read the file", "--repo", str(repo), "--model", f"scripted:{script}",
                              "-c", "context.rerank=false"])
    assert res.exit_code == 0, res.output
    assert "summary" in res.output and "submitted" in res.output
    res = runner.invoke(app, ["sessions", "list", "--repo", str(repo)])
    assert res.exit_code == 0 and "read the file" in res.output
    sid = next(line.split()[1] for line in res.output.splitlines() if "s-" in line)
    res = runner.invoke(app, ["sessions", "show", sid, "--repo", str(repo)])
    assert res.exit_code == 0 and "tool_result" in res.output
    res = runner.invoke(app, ["sessions", "export", sid, "--repo", str(repo)])
    doc = json.loads(res.output)
    assert doc["format_version"] == 1 and [e["seq"] for e in doc["events"]] == list(range(1, len(doc["events"]) + 1))
    res = runner.invoke(app, ["sessions", "resume", sid, "--repo", str(repo), "--json", "--model", f"scripted:{script}"])
    assert res.exit_code == 0 and json.loads(res.output)["submitted"]


def test_run_fails_loudly_when_the_context_package_cannot_be_imported(repo, tmp_path, monkeypatch):
    """A broken `lagoon.context` must not turn into "no retrieval, every validation passes"."""
    import sys

    script = tmp_path / "s.json"
    script.write_text(json.dumps([{"tool": ["submit", {"summary": "done"}]}]))
    args = ["run", "read the file", "--repo", str(repo), "--model", f"scripted:{script}", "-c", "context.rerank=false"]
    for name in [m for m in sys.modules if m == "lagoon.context" or m.startswith("lagoon.context.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lagoon.context", None)  # `import lagoon.context` now raises ImportError
    res = runner.invoke(app, args)
    assert isinstance(res.exception, ImportError) and "lagoon.context" in str(res.exception), res.output
    assert "submitted" not in res.output


def test_max_steps_and_bad_input_exit_cleanly(repo, tmp_path):
    script = tmp_path / "s.json"
    script.write_text(json.dumps([{"bash": "true"}] * 5))
    res = runner.invoke(app, ["run", "spin", "--repo", str(repo), "--json", "--max-steps", "2",
                              "--model", f"scripted:{script}", "-c", "context.rerank=false"])
    assert res.exit_code == 1 and json.loads(res.output)["exit_status"] == "limits_exceeded"
    res = runner.invoke(app, ["run", "x", "--repo", str(repo), "--model", "nope:1"])
    assert res.exit_code == 2 and "router, scripted" in res.output
    res = runner.invoke(app, ["run", "x", "--repo", str(tmp_path / "missing"), "--model", f"scripted:{script}"])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = runner.invoke(app, ["sessions", "list", "--repo", str(tmp_path)])
    assert res.exit_code == 2 and "no sessions" in res.output


@pytest.mark.network
def test_run_through_the_router_over_loopback_servers(repo):
    from lagoon.routing.fault_server import FaultServer

    with FaultServer(["503"], tool_call=("submit", {"summary": "done"})) as cheap, FaultServer(reply="strong") as strong:
        res = runner.invoke(app, [
            "run", "fix the failing lint test", "--repo", str(repo), "--json",
            "-c", "context.rerank=false",
            "-c", f"routing.retrieval_bound.endpoint={cheap.url}/v1/chat/completions",
            "-c", "routing.retrieval_bound.model=coder",
            "-c", f"routing.reasoning_bound.endpoint={strong.url}/v1/chat",
            "-c", "routing.reasoning_bound.api_key_env=null",
            "-c", "routing.backoff_base_s=0.01",
        ])
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out["submitted"] and out["backends"] == {"retrieval_bound": 1} and out["model_used"] == "coder"
        assert strong.requests == []
        wire = cheap.requests[-1]["body"]
        assert {t["function"]["name"] for t in wire["tools"]} >= {"bash", "view", "edit", "submit"}



def test_live_view_and_summary_show_memory_evictions(repo, tmp_path):
    script = tmp_path / "s.json"
    script.write_text(json.dumps([{"bash": f"seq {i} {i + 120}"} for i in range(6)]
                                 + [{"tool": ["submit", {"summary": "done"}]}]))
    res = runner.invoke(app, ["run", "count", "--repo", str(repo), "--model", f"scripted:{script}",
                              "-c", "context.rerank=false", "-c", "agent.summaries=extractive",
                              "-c", "model_deployment.memory.context_budget=700"])
    assert res.exit_code == 0, res.output
    assert res.output.count("evicted") >= 2 and "extractive" in res.output
    assert "memory summaries" in res.output and "extractive" in res.output
