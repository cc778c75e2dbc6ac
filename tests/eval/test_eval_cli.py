"""`lagoon eval`: runs a suite, writes results, summary and report, resumes, and fails cleanly."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lagoon.cli.app import app

runner = CliRunner()


def test_eval_oracle_writes_results_summary_report(starter, tmp_path):
    args = ["eval", str(starter), "--agent", "oracle", "--task", "js-slugify", "--out", str(tmp_path)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "100.0%" in result.output
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["task_id"] for r in rows) == ["js-slugify"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["format_version"] == 1 and summary["pass_rate"] == 1.0 and summary["spec_errors"] == []
    assert "data:image/png;base64," in (tmp_path / "report.html").read_text()
    again = runner.invoke(app, args)  # everything is already done: nothing re-runs
    assert again.exit_code == 0 and "1 resumed" in again.output


def test_eval_config_benchmarks_and_errors(starter, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model_deployment:\n  evaluation:\n    benchmarks: ['{starter}']\n")
    ok = runner.invoke(
        app, ["eval", "-a", "none", "-t", "js-slugify", "-c", str(cfg), "-c", "eval.sandbox=none", "-o", str(tmp_path / "o")]
    )
    assert ok.exit_code == 0, ok.output
    assert "no bubblewrap sandbox" in ok.output  # says so when it runs without bwrap
    assert (tmp_path / "o" / "results.jsonl").is_file()  # one suite: --out is the run folder
    bad = runner.invoke(app, ["eval", str(starter), "--agent", "gpt", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "unknown agent 'gpt'; valid: lagoon, oracle, none" in bad.output
    missing = runner.invoke(app, ["eval", "no-such-suite", "-o", str(tmp_path / "y")])
    assert missing.exit_code == 2 and "not found" in missing.output

