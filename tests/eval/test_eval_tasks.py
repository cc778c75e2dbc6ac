"""Suite loading: the three formats, and bad specs reported with file and field while the rest loads."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest

from lagoon.errors import TaskSpecError
from lagoon.eval.tasks import load_suite, parse_date


def test_starter_suite_loads_every_format_and_language(starter):
    suite = load_suite(starter)
    assert suite.errors == []
    formats = Counter(t.format for t in suite.tasks)
    assert formats["tb1"] >= 6 and formats["tb2"] >= 6 and formats["swebench"] == 3
    assert len([t for t in suite.tasks if t.format != "swebench"]) >= 12
    assert {"python", "javascript", "rust", "shell"} <= {t.category for t in suite.tasks}
    for t in suite.tasks:
        assert t.instruction and t.created_at
        if t.format != "swebench":
            assert t.solution is not None and t.solution.is_file()
            assert t.test_script is not None and t.test_script.is_file()
    swe = {t.id: t for t in suite.tasks if t.format == "swebench"}["minicalc__clamp-2"].swe
    assert swe.fail_to_pass == ("tests/test_clamp.py::test_clamp_high",)
    assert (swe.mirror / "HEAD").is_file() and "{tests}" in swe.test_cmd


def test_mirror_builder_is_deterministic(starter, tmp_path):
    """The JSONL's base_commit is reproducible: regenerating the instances gives the same file."""
    import subprocess
    import sys

    out = tmp_path / "again.jsonl"
    subprocess.run([sys.executable, str(starter / "swebench/build_repo.py"), "--jsonl", str(out)], check=True)
    assert out.read_text() == (starter / "swebench/instances.jsonl").read_text()


def _copy_task(starter, rel, dest):
    shutil.copytree(starter / rel, dest / rel.split("/")[-1])


def test_bad_specs_name_file_and_field_and_rest_loads(starter, tmp_path):
    _copy_task(starter, "tb1/js-slugify", tmp_path)
    _copy_task(starter, "tb2/js-matrix", tmp_path)
    bad1 = tmp_path / "no-instruction"
    shutil.copytree(starter / "tb1/js-slugify", bad1)
    (bad1 / "task.yaml").write_text("category: x\n")
    bad2 = tmp_path / "bad-toml"
    shutil.copytree(starter / "tb2/js-matrix", bad2)
    (bad2 / "task.toml").write_text("[metadata\ncategory = 1\n")
    bad3 = tmp_path / "bad-timeout"
    shutil.copytree(starter / "tb1/js-slugify", bad3)
    (bad3 / "task.yaml").write_text("instruction: do it\nmax_agent_timeout_sec: soon\n")
    swe = tmp_path / "swe"
    shutil.copytree(starter / "swebench", swe)
    rows = (swe / "instances.jsonl").read_text().splitlines()
    broken = json.loads(rows[1])
    del broken["base_commit"]
    (swe / "instances.jsonl").write_text("\n".join([rows[0], json.dumps(broken), "{not json", rows[2]]) + "\n")

    suite = load_suite(tmp_path)
    ids = {t.id for t in suite.tasks}
    assert {"js-slugify", "js-matrix", "minicalc__mean-1", "minicalc__parse-3"} <= ids
    assert not {"no-instruction", "bad-toml", "bad-timeout"} & ids
    text = "\n".join(str(e) for e in suite.errors)
    assert len(suite.errors) == 5
    assert "no-instruction/task.yaml: field 'instruction'" in text
    assert "bad-toml/task.toml: invalid TOML" in text
    assert "field 'max_agent_timeout_sec'" in text
    assert "instances.jsonl:2: field 'base_commit'" in text
    assert "instances.jsonl:3: not JSON" in text


def test_swe_repo_without_mirror_is_a_spec_error(starter, tmp_path):
    swe = tmp_path / "swe"
    shutil.copytree(starter / "swebench", swe)
    (swe / "swebench.yaml").write_text("repos:\n  lagoon/minicalc:\n    test_cmd: pytest {tests}\n")
    suite = load_suite(swe)
    assert suite.tasks == [] and len(suite.errors) == 3
    assert "has no mirror" in str(suite.errors[0]) and "swebench.yaml" in str(suite.errors[0])


def test_duplicate_ids_and_missing_suite(starter, tmp_path):
    _copy_task(starter, "tb1/js-slugify", tmp_path / "a")
    _copy_task(starter, "tb1/js-slugify", tmp_path / "b")
    suite = load_suite(tmp_path)
    assert len(suite.tasks) == 1 and "also used by" in str(suite.errors[0])
    with pytest.raises(TaskSpecError, match="no such suite"):
        load_suite(tmp_path / "nope")


def test_parse_date():
    assert parse_date("2025-03-10T09:00:00Z", "x") == "2025-03-10"
    assert parse_date(None, "x") is None
    with pytest.raises(TaskSpecError, match="YYYY-MM-DD"):
        parse_date("last week", "task.yaml: field 'created_at'")


def test_eval_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, lagoon.eval, lagoon.cli.eval_cmd; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
