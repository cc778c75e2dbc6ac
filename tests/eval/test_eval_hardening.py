"""`lagoon eval` fails when no task could run; duplicate YAML keys are refused by name (configs,
overrides, task files); matplotlib's warnings stay off the terminal."""

from __future__ import annotations

import json
import logging
import shutil
import warnings

import pytest
from typer.testing import CliRunner

from lagoon.cli.app import app
from lagoon.config import load_config
from lagoon.errors import ConfigError
from lagoon.eval import TrialResult, summarize
from lagoon.eval.report import plots, write_report
from lagoon.eval.tasks import load_suite
from lagoon.yaml_loader import DuplicateKeyError, load_yaml

runner = CliRunner()


def _suite_with_duplicate_key(starter, tmp_path):
    suite = tmp_path / "suite"
    shutil.copytree(starter / "tb1" / "py-fizzbuzz", suite / "py-fizzbuzz")
    spec = suite / "py-fizzbuzz" / "task.yaml"
    spec.write_text(spec.read_text() + "category: shell\n")  # `category` is already there
    return suite


def test_duplicate_key_in_a_task_file_is_a_spec_error_naming_it(starter, tmp_path):
    loaded = load_suite(_suite_with_duplicate_key(starter, tmp_path))
    assert loaded.tasks == [] and len(loaded.errors) == 1
    assert "field 'category' appears twice" in str(loaded.errors[0]) and "keep only one" in str(loaded.errors[0])


def test_duplicate_key_in_swebench_yaml(starter, tmp_path):
    swe = tmp_path / "swe"
    shutil.copytree(starter / "swebench", swe)
    spec = swe / "swebench.yaml"
    spec.write_text(spec.read_text() + "repos:\n  other/repo:\n    test_cmd: pytest\n")
    loaded = load_suite(swe / "instances.jsonl")
    assert any("field 'repos' appears twice" in str(e) for e in loaded.errors)


def test_eval_exits_non_zero_when_no_task_could_run(starter, tmp_path):
    suite = _suite_with_duplicate_key(starter, tmp_path)
    res = runner.invoke(app, ["eval", str(suite), "-a", "oracle", "-o", str(tmp_path / "o"), "-c", "eval.sandbox=none"])
    assert res.exit_code == 2, res.output
    assert "no task could run" in res.output and "1 spec errors" in res.output
    assert (tmp_path / "o" / "report.html").is_file()  # the report still says why
    res = runner.invoke(app, ["eval", str(starter), "-a", "oracle", "-t", "no-such-task", "-o", str(tmp_path / "p"),
                              "-c", "eval.sandbox=none"])
    assert res.exit_code == 2 and "no task could run" in res.output and "no tasks selected" in res.output


def test_duplicate_keys_in_config_files_and_overrides_are_refused(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("agent:\n  step_limit: 5\ncontext:\n  top_k: 3\nagent:\n  cost_limit: 1.0\n")
    with pytest.raises(ConfigError, match=r"c.yaml: key 'agent' appears twice \(lines 1 and 5\); keep only one"):
        load_config(cfg)
    nested = tmp_path / "n.yaml"
    nested.write_text("agent:\n  step_limit: 5\n  step_limit: 6\n")
    with pytest.raises(ConfigError, match="key 'step_limit' appears twice"):
        load_config(nested)
    with pytest.raises(ConfigError, match="names key 'step_limit' twice"):
        load_config("agent={step_limit: 1, step_limit: 2}")
    res = runner.invoke(app, ["config", "show", "-c", str(cfg)])
    assert res.exit_code == 2 and "'agent' appears twice" in res.output
    # what stays legal: the same key in different mappings, and a merge key overridden
    assert load_yaml("a: {x: 1}\nb: {x: 2}\nbase: &b {k: 1}\nc:\n  <<: *b\n  k: 2\n")["c"] == {"k": 2}
    with pytest.raises(DuplicateKeyError):
        load_yaml("- {k: 1, k: 2}\n")


def test_report_plots_raise_no_warning_and_log_nothing(tmp_path, caplog, capfd):
    caplog.set_level(logging.WARNING, logger="matplotlib")
    rows = [TrialResult(task_id="t", agent="oracle", format="tb2", status="environment_unsupported",
                        failure_mode="environment_unsupported")]
    summary = {"by_category": {"x": {"pass_rate": 0.0, "ci95": [0.0, 0.0]}}, "routing_share": {}}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert "Cost vs pass" in plots(rows, summary)  # nothing scored: an empty legend used to warn
    assert seen == [] and caplog.records == []
    assert capfd.readouterr().err == ""
    assert logging.getLogger("matplotlib").level != logging.ERROR  # the quiet level was put back
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        summary_path, report = write_report(tmp_path, rows, summarize(rows))
    assert seen == [] and caplog.records == [] and capfd.readouterr().err == ""
    assert report.is_file() and json.loads(summary_path.read_text())["tasks"] == 1


def test_every_yaml_read_in_the_package_goes_through_load_yaml():
    from pathlib import Path

    src = Path(__file__).parents[2] / "src" / "lagoon"
    offenders = [str(p.relative_to(src)) for p in src.rglob("*.py")
                 if p.name != "yaml_loader.py" and any(s in p.read_text() for s in ("yaml.safe_load(", "yaml.load("))]
    assert offenders == [], f"read YAML with lagoon.yaml_loader.load_yaml (duplicate keys refused): {offenders}"
