"""`lagoon route`, `lagoon chat` and `lagoon router fit` end to end (CliRunner, loopback servers)."""

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lagoon.cli.app import app
from lagoon.routing.fault_server import FaultServer

DATA = Path(__file__).resolve().parents[2] / "examples" / "routing" / "prompts.jsonl"
runner = CliRunner()


def test_route_shows_classification_and_backend_without_calling():
    res = runner.invoke(app, ["route", "fix the failing lint test", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["classification"]["type"] == "RETRIEVAL_BOUND" and out["backend"] == "retrieval_bound"
    assert [b["route"] for b in out["order"]] == ["retrieval_bound", "reasoning_bound"]
    res = runner.invoke(app, ["route", "fix the failing lint test", "--context-size", "20000", "-c", "routing.fallback=false"])
    assert res.exit_code == 0 and "REASONING_BOUND" in res.output and "lexical:context_size" in res.output
    assert "fallback" not in res.output


@pytest.mark.network
def test_chat_reports_answer_backend_retries_and_fallback():
    with FaultServer(["503", "503", "503"], reply="cheap") as cheap, FaultServer(reply="strong") as strong:
        args = [
            "chat", "fix the failing lint test", "--json",
            "-c", f"routing.retrieval_bound.endpoint={cheap.url}/v1/chat/completions",
            "-c", "routing.retrieval_bound.model=coder",
            "-c", f"routing.reasoning_bound.endpoint={strong.url}/v1/chat",
            "-c", "routing.reasoning_bound.api_key_env=null",
            "-c", "routing.backoff_base_s=0.01",
        ]
        res = runner.invoke(app, args)
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out["answer"] == "strong" and out["backend"] == "reasoning_bound" and out["retries"] == 2
        assert out["classification"]["type"] == "RETRIEVAL_BOUND"
        assert out["fallbacks"] == [{"from": "retrieval_bound", "to": "reasoning_bound", "reason": "error:BackendUnavailableError"}]
        cheap.faults.append("503")
        res = runner.invoke(app, [*args, "-c", "routing.fallback=false", "-c", "routing.max_retries=0"])
        assert res.exit_code == 2 and json.loads(res.output)["attempts"][0]["outcome"] == "BackendUnavailableError"


def test_router_fit_reports_holdout_and_saves(tmp_path):
    out = tmp_path / "r.joblib"
    res = runner.invoke(app, ["router", "fit", str(DATA), "-o", str(out), "--no-embeddings"])
    assert res.exit_code == 0, res.output
    assert "held-out" in res.output and "group split" in res.output and out.is_file()
    res = runner.invoke(app, ["route", "Rename `get_user` to `fetch_user` in src/api/handlers.py.", "--json",
                              "-c", "classification.classifier=learned", "-c", f"classification.model_path={out}"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["classification"]["decided_by"].startswith("learned:")
    res = runner.invoke(app, ["router", "fit", str(tmp_path / "missing.jsonl")])
    assert res.exit_code == 2 and "no such file" in res.output
