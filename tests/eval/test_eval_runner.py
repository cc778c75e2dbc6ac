"""Running suites: oracle passes, none fails, resume, broken specs, filters, agents, report."""

from __future__ import annotations

import base64
import json
import shutil
import sys
from pathlib import Path

import pytest

from lagoon.config import load_config
from lagoon.errors import ConfigError
from lagoon.eval import read_results, run_suite, split_for_fitting, summarize, write_report
from lagoon.eval.runner import select_tasks
from lagoon.eval.tasks import load_suite
from lagoon.eval.trial import ScriptedModels

STARTER = Path(__file__).resolve().parents[2] / "examples" / "suites" / "starter"
# fast tasks, one per format and language; the whole suite runs in the slow tests
SUBSET = ["js-slugify", "rust-brackets", "py-fizzbuzz", "minicalc__mean-1"]


@pytest.fixture(scope="module")
def oracle_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("oracle")
    return run_suite(STARTER, "oracle", load_config(), out, only=SUBSET)


def test_oracle_passes_every_task(oracle_run):
    assert len(oracle_run.results) == len(SUBSET)
    assert all(r.passed and r.status == "passed" for r in oracle_run.results), [
        (r.task_id, r.status, r.error, r.test_output[-300:]) for r in oracle_run.results if not r.passed
    ]
    assert {r.format for r in oracle_run.results} == {"tb1", "tb2", "swebench"}
    assert all(r.command_success_rate == 1.0 for r in oracle_run.results)
    rows = read_results(oracle_run.out_dir / "results.jsonl")
    assert sorted(r.task_id for r in rows) == sorted(SUBSET)


def test_none_passes_nothing(starter, tmp_path):
    outcome = run_suite(starter, "none", load_config(), tmp_path, only=SUBSET)
    assert len(outcome.results) == len(SUBSET)
    assert not any(r.passed for r in outcome.results)
    assert all(r.status == "failed" and r.steps == 0 for r in outcome.results)
    summary = summarize(outcome.results)  # a 0% run still renders (error bars at the bound)
    assert summary["pass_rate"] == 0.0
    assert 'alt="Pass rate by category"' in write_report(tmp_path, outcome.results, summary)[1].read_text()


def test_report_has_plots_and_versioned_summary(oracle_run):
    summary = summarize(oracle_run.results)
    summary_path, report_path = write_report(oracle_run.out_dir, oracle_run.results, summary)
    assert json.loads(summary_path.read_text())["format_version"] == 1
    html = report_path.read_text()
    images = html.count('src="data:image/png;base64,')
    assert images >= 3
    for title in ("Pass rate by category", "Steps histogram", "Cost vs pass"):
        assert f'alt="{title}"' in html
    png = html.split('src="data:image/png;base64,', 1)[1].split('"', 1)[0]
    assert base64.b64decode(png).startswith(b"\x89PNG")
    assert "<script" not in html and "http" not in html.replace("http-equiv", "")
    # routing share and expert load appear when the results carry them
    rows = [r.model_copy(update={"backends": {"open": 3, "strong": 1}, "expert_load": [5, 1, 2, 0]})
            for r in oracle_run.results]
    html = write_report(oracle_run.out_dir / "r2", rows, summarize(rows))[1].read_text()
    assert 'alt="Routing share"' in html and 'alt="Expert load"' in html


def test_expert_load_of_an_in_process_moe_model_reaches_the_report(starter, tmp_path, monkeypatch):
    """The lagoon agent over a local tiny MoE model: the trial records the tokens its experts
    routed, and the report draws them (no hand-made `expert_load`)."""
    from lagoon.engine.tiny import save_tiny_model

    # eager decode: compiling the MoE step would add ~18 s here (compiled MoE statistics are tested
    # in tests/moe/test_moe_compiled.py)
    monkeypatch.setenv("LAGOON_COMPILE", "0")

    folder = save_tiny_model(tmp_path / "moe", "qwen3_moe", max_position_embeddings=8192)
    route = {"model": str(folder), "endpoint": "local", "max_tokens": 4, "temperature": 0.0}
    # the agent's prompt (system, tools, task) takes ~4.4k tokens of the tiny model's tokenizer
    cfg = load_config({"context": {"rerank": False}, "agent": {"step_limit": 1}, "engine": {"max_seq_len": 8192},
                       "routing": {"retrieval_bound": route, "reasoning_bound": route}})
    outcome = run_suite(starter, "lagoon", cfg, tmp_path / "out", only=["js-slugify"])
    (row,) = outcome.results
    assert row.agent_exit == "limits_exceeded" and row.steps == 1, row  # one real model step ran
    assert row.expert_load is not None and len(row.expert_load) == 4, row
    assert sum(row.expert_load) > 0 and sum(row.expert_load) % 2 == 0  # top-2: each token fills 2 slots
    summary = summarize(outcome.results)
    assert summary["expert_load"] == row.expert_load
    html = write_report(tmp_path / "report", outcome.results, summary)[1].read_text()
    assert 'alt="Expert load"' in html


def test_interrupted_run_resumes_where_it_stopped(starter, tmp_path):
    subset = ["js-slugify", "js-matrix", "js-lru-cache"]
    seen = []

    def stop_after_two(row):
        seen.append(row.task_id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_suite(starter, "none", load_config(), tmp_path, only=subset, on_result=stop_after_two)
    results = tmp_path / "results.jsonl"
    assert len(read_results(results)) == 2
    with open(results, "a") as fh:  # a kill mid-write leaves a torn line
        fh.write('{"task_id": "js-lru-ca')
    again = []
    outcome = run_suite(starter, "none", load_config(), tmp_path, only=subset, on_result=lambda r: again.append(r.task_id))
    assert again == [t for t in subset if t not in seen]
    assert outcome.resumed == 2
    rows = read_results(results)
    assert sorted(r.task_id for r in rows) == sorted(subset)
    with pytest.raises(ConfigError, match="another --out"):
        run_suite(starter, "oracle", load_config(), tmp_path, only=subset)


def test_broken_spec_is_reported_and_skipped(starter, tmp_path):
    suite = tmp_path / "suite"
    shutil.copytree(starter / "tb2/js-matrix", suite / "js-matrix")
    shutil.copytree(starter / "tb2/js-matrix", suite / "broken")
    (suite / "broken/instruction.md").unlink()
    outcome = run_suite(suite, "oracle", load_config(), tmp_path / "out")
    assert [r.task_id for r in outcome.results] == ["js-matrix"] and outcome.results[0].passed
    assert len(outcome.spec_errors) == 1 and "broken: file 'instruction.md' is missing" in outcome.spec_errors[0]


def test_unsupported_environment_is_reported_not_failed(starter, tmp_path):
    suite = tmp_path / "suite"
    shutil.copytree(starter / "tb2/js-matrix", suite / "needs-apt")
    df = suite / "needs-apt/environment/Dockerfile"
    df.write_text(df.read_text() + "RUN apt-get install -y jq\n")
    outcome = run_suite(suite, "oracle", load_config(), tmp_path / "out")
    (row,) = outcome.results
    assert row.status == "environment_unsupported" and "needs the network" in row.error
    s = summarize(outcome.results)
    assert s["scored"] == 0 and s["environment_unsupported"] == ["needs-apt"]


def test_created_after_and_held_out_split(starter, tmp_path):
    tasks = load_suite(starter).tasks
    kept, dropped = select_tasks(tasks, "2025-08-01")
    assert kept and dropped and all(t.created_at >= "2025-08-01" for t in kept)
    outcome = run_suite(starter, "none", load_config(), tmp_path, created_after="2025-10-01", only=["js-lru-cache", "js-slugify"])
    assert [r.task_id for r in outcome.results] == ["js-lru-cache"] and "js-slugify" in outcome.dropped

    cfg = load_config({"eval": {"created_after": "2025-08-01"},
                       "model_deployment": {"evaluation": {"holdout_repos": ["lagoon/minicalc"]}}})
    usable, held = split_for_fitting(tasks, cfg)
    assert all(t.repo != "lagoon/minicalc" and t.created_at < "2025-08-01" for t in usable)
    assert {t.id for t in held} >= {"minicalc__mean-1", "js-lru-cache"}
    assert outcome.results[0].held_out is True  # created 2025-11-08, after the split
    off = load_config({"eval": {"created_after": "2025-08-01"}, "model_deployment": {"evaluation": {"temporal_split": False}}})
    assert split_for_fitting(tasks, off)[1] == []
    rows_usable, rows_held = split_for_fitting(outcome.results, cfg)
    assert rows_usable == [] and len(rows_held) == 1


def _scripted_run(tmp_path, only):
    scripts = STARTER / "scripts"
    cfg = load_config("context.rerank=false")
    outcome = run_suite(STARTER, "lagoon", cfg, tmp_path, only=only, model_factory=ScriptedModels(scripts))
    by_id = {r.task_id: r for r in outcome.results}
    for tid in only:
        r = by_id[tid]
        if not (scripts / f"{tid}.json").is_file():
            assert not r.passed and r.failure_mode == "agent_error"
            continue
        assert r.passed, (tid, r.error, r.test_output[-400:])
        assert r.agent_exit == "submitted" and r.steps >= 3 and r.backends == {"scripted": r.steps}
        assert r.tokens.total > 0 and r.command_success_rate == 1.0


def test_scripted_lagoon_agent_passes_the_tasks_it_has_scripts_for(tmp_path):
    """`lagoon.testing`'s replayed scripts through `lagoon.agent.run_task` in the sandbox; a task
    without a script fails (here one TB1 task, one SWE-bench task, one unscripted)."""
    _scripted_run(tmp_path, ["py-fizzbuzz", "minicalc__clamp-2", "js-matrix"])


@pytest.mark.slow
def test_scripted_lagoon_agent_every_script(tmp_path):
    _scripted_run(tmp_path, sorted(p.stem for p in (STARTER / "scripts").glob("*.json")))


def test_executor_registry_and_ray_hint(starter, tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="eval.executor: unknown executor 'dask'; valid: local, ray"):
        run_suite(starter, "none", load_config(), tmp_path, executor="dask", only=["js-slugify"])
    with pytest.raises(ConfigError, match="unknown agent 'gpt'; valid: lagoon, oracle, none"):
        run_suite(starter, "gpt", load_config(), tmp_path)
    monkeypatch.setitem(sys.modules, "ray", None)  # as if the optional extra were not installed
    with pytest.raises(ConfigError, match=r"pip install 'lagoon-agent\[ray\]'"):
        run_suite(starter, "none", load_config("eval.executor=ray"), tmp_path, only=["js-slugify"])


@pytest.mark.slow
def test_process_pool_gives_the_same_results(starter, tmp_path):
    subset = ["js-slugify", "js-matrix", "rust-brackets"]
    one = run_suite(starter, "oracle", load_config(), tmp_path / "one", only=subset)
    two = run_suite(starter, "oracle", load_config("eval.workers=2"), tmp_path / "two", only=subset)
    assert _stable(one.results) == _stable(two.results)


_TIMING = {"latency_ms", "test_duration_s", "test_output"}


def _stable(rows):
    return sorted(json.dumps({k: v for k, v in r.to_row().items() if k not in _TIMING}, sort_keys=True) for r in rows)


@pytest.mark.slow
@pytest.mark.parametrize("agent", ["oracle", "none"])
def test_whole_starter_suite(agent, tmp_path):
    """The proof on every task: the oracle solves all of them, doing nothing solves none."""
    outcome = run_suite(STARTER, agent, load_config("eval.workers=2"), tmp_path)
    assert outcome.spec_errors == []
    assert len(outcome.results) == len(load_suite(STARTER).tasks) >= 15
    want = agent == "oracle"
    wrong = [(r.task_id, r.status, r.error) for r in outcome.results if r.passed != want]
    assert not wrong


def test_eval_limits_and_sandbox_keys_take_effect(starter, tmp_path):
    """eval.task_timeout_s, eval.test_timeout_s and eval.output_limit_bytes apply to a task that sets
    no limits of its own; eval.sandbox picks the sandbox."""
    task = tmp_path / "suite" / "slow-task"
    shutil.copytree(starter / "tb2/js-matrix", task)
    (task / "task.toml").write_text('[metadata]\ncategory = "shell"\n')
    (task / "solution/solve.sh").write_text("sleep 20\n")
    (task / "tests/test.sh").write_text("head -c 50000 /dev/zero | tr '\\0' x; echo; sleep 20\n")
    cfg = load_config("eval.task_timeout_s=0.5", "eval.test_timeout_s=0.5", "eval.output_limit_bytes=1024")
    (row,) = run_suite(tmp_path / "suite", "oracle", cfg, tmp_path / "out").results
    assert row.commands[0].exit_code == 124 and row.failure_mode == "test_timeout"
    assert "bytes cut" in row.test_output and len(row.test_output) < 1200
    (plain,) = run_suite(starter, "none", load_config("eval.sandbox=none"), tmp_path / "plain", only=["js-slugify"]).results
    assert plain.sandbox == "none" and not plain.passed


@pytest.mark.slow
def test_ray_executor_gives_the_same_results_as_local(starter, tmp_path):
    """Against a local `ray.init()`: same rows as the local executor (timings aside)."""
    ray = pytest.importorskip("ray")
    subset = ["js-slugify", "rust-brackets", "minicalc__clamp-2", "sh-checksums"]
    try:
        for agent in ("oracle", "none"):
            local = run_suite(starter, agent, load_config(), tmp_path / f"local-{agent}", only=subset)
            remote = run_suite(starter, agent, load_config("eval.executor=ray", "eval.workers=2"),
                               tmp_path / f"ray-{agent}", only=subset)
            assert len(remote.results) == len(subset)
            assert _stable(local.results) == _stable(remote.results)
    finally:
        ray.shutdown()
