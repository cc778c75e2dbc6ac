"""The demo's closing report: the sample repository's scripted solution finishes within the demo
config's step limit through the real pipeline (index, snapshot, gate, tools, session) and reports
no problem; a run whose replies are not actions is reported as broken (exit 1)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from lagoon.agent import run_task
from lagoon.agent.run_report import RunReport, main
from lagoon.config import load_config
from lagoon.testing import ReplayChatModel

HERE = Path(__file__).parent
ROOT = HERE.parents[1]
DEMO = load_config(ROOT / "examples" / "configs" / "demo.yaml")


@pytest.fixture
def repo(tmp_path, monkeypatch):
    dst = tmp_path / "repo"
    shutil.copytree(ROOT / "examples" / "sample-repo", dst, ignore=shutil.ignore_patterns("__pycache__", ".lagoon"))
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    return dst


def test_scripted_solution_fits_the_demo_step_limit_and_reports_healthy(repo, capsys):
    model = ReplayChatModel.from_file(str(HERE / "sample_solution.json"))
    result = run_task("Fix the failing test", repo, DEMO, model=model)
    assert result.submitted and result.steps <= DEMO.agent.step_limit
    report = RunReport.from_workspace(repo)
    assert report.problems() == [] and report.actions == 5 and report.index_built
    assert main([str(repo)]) == 0
    out = capsys.readouterr().out
    assert "The pipeline worked" in out and "fixed and submitted" in out and "edit" in out
    assert "textstats.py" in out and "→ ok:" in out  # each call's argument and its outcome


def test_replies_that_are_not_actions_are_a_broken_pipeline(repo, capsys):
    run_task("Fix the failing test", repo, DEMO, model=ReplayChatModel(["I think", "still thinking", "hmm"]))
    report = RunReport.from_workspace(repo)
    assert any(p.startswith("actions:") for p in report.problems())
    assert any("format_error" in p for p in report.problems())
    assert main([str(repo)]) == 1 and "BROKE" in capsys.readouterr().out
