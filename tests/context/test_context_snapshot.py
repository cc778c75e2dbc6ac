"""Snapshots: every validation reason, re-verification, consumed-chunk TTL and invalidation, audit."""

from __future__ import annotations

import json

import pytest

from lagoon.config import ValidationSection
from lagoon.context.chunking import chunk_file
from lagoon.context.complexity import complexity_score
from lagoon.context.index import CodeIndex
from lagoon.context.snapshot import EXPORT_FORMAT, ContextManager, Snapshot


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def chunks(repo, config):
    ix = CodeIndex(repo, config)
    ix.update()
    return [c for c in ix.chunks if c.path in ("pkg/geometry.py", "web/app.js")]


def _mgr(repo, config, clock, **validation):
    return ContextManager(repo, config, ValidationSection(**validation), clock=clock)


def test_fresh_snapshot_is_valid_and_records_file_hashes(repo, config, clock, chunks):
    m = _mgr(repo, config, clock)
    snap = m.create_snapshot("t1", chunks, {"tests_pass_before_edit": True})
    assert snap.version == 1 and snap.last_verified_at == clock.t
    assert set(snap.source_files) == {"pkg/geometry.py", "web/app.js"}
    assert all(h for h in snap.source_files.values())
    report = m.validate(snap)
    assert report.ok and report.reasons == ()


def test_stale_only_when_fresh_context_is_required(repo, config, clock, chunks):
    snap = _mgr(repo, config, clock).create_snapshot("t", chunks, {})
    clock.t += config.staleness_threshold_ms / 1000 + 1
    report = _mgr(repo, config, clock).validate(snap)
    assert report.codes == ["stale"] and not report.ok
    assert _mgr(repo, config, clock, require_fresh_context=False).validate(snap).ok
    short = config.model_copy(update={"staleness_threshold_ms": 10})
    clock.t = snap.last_verified_at + 0.011
    assert ContextManager(repo, short, ValidationSection(), clock=clock).validate(snap).codes == ["stale"]


def test_unverified_assumptions_rejected_only_when_configured(repo, config, clock, chunks):
    m = _mgr(repo, config, clock)
    snap = m.create_snapshot("t", chunks, {"api_is_stable": False, "tests_exist": True})
    report = m.validate(snap)
    assert report.codes == ["unverified_assumptions"]
    assert report.reasons[0].subjects == ("api_is_stable",)
    assert _mgr(repo, config, clock, reject_unverified_assumptions=False).validate(snap).ok
    verified = m.verify_assumption(snap, "api_is_stable")
    assert verified.assumptions["api_is_stable"].holds is True and verified.version == 2
    assert verified.assumptions["api_is_stable"].checked_at == clock.t
    assert m.validate(verified).ok


def test_too_many_assumptions(repo, config, clock, chunks):
    cfg = config.model_copy(update={"max_assumptions_per_snapshot": 2})
    m = ContextManager(repo, cfg, ValidationSection(), clock=clock)
    snap = m.create_snapshot("t", chunks, {f"a{i}": True for i in range(3)})
    assert m.validate(snap).codes == ["too_many_assumptions"]


def test_source_changed_and_deleted(repo, config, clock, chunks):
    m = _mgr(repo, config, clock)
    snap = m.create_snapshot("t", chunks, {})
    (repo / "pkg" / "geometry.py").write_text("# rewritten\n")
    (repo / "web" / "app.js").unlink()
    report = m.validate(snap)
    assert report.codes == ["source_changed", "source_deleted"]
    assert report.reasons[0].subjects == ("pkg/geometry.py",)
    assert report.reasons[1].subjects == ("web/app.js",)


def test_every_reason_at_once(repo, config, clock, chunks):
    cfg = config.model_copy(update={"max_assumptions_per_snapshot": 0})
    m = ContextManager(repo, cfg, ValidationSection(), clock=clock)
    snap = m.create_snapshot("t", chunks, {"x": False})
    clock.t += 10_000
    (repo / "pkg" / "geometry.py").write_text("# rewritten\n")
    (repo / "web" / "app.js").unlink()
    codes = m.validate(snap).codes
    assert codes == [
        "stale",
        "unverified_assumptions",
        "too_many_assumptions",
        "source_changed",
        "source_deleted",
    ]


def test_increment_version_follows_config(repo, config, clock, chunks):
    m = _mgr(repo, config, clock)
    snap = m.create_snapshot("t", chunks, {})
    clock.t += 1000
    assert not m.validate(snap).ok
    again = m.increment_version(snap)
    assert again.version == 2 and again.last_verified_at == clock.t and m.validate(again).ok
    flat = ContextManager(
        repo,
        config.model_copy(update={"version_increment_on_validation": False}),
        ValidationSection(),
        clock=clock,
    )
    clock.t += 5
    same = flat.increment_version(again)
    assert same.version == 2 and same.last_verified_at == clock.t
    assert [s.version for s in m.history("t")] == [1, 2]
    # A second snapshot for the same task continues the numbering.
    assert m.create_snapshot("t", chunks[:1], {}).version == 3


def test_consumed_chunks_expire_after_ttl_and_invalidate_on_edit(repo, config, clock, chunks):
    cfg = config.model_copy(update={"chunk_ttl_s": 60})
    m = ContextManager(repo, cfg, ValidationSection(), clock=clock)
    geo = [c for c in chunks if c.path == "pkg/geometry.py"]
    js = [c for c in chunks if c.path == "web/app.js"]
    assert m.chunk_state(geo[0]) == "unused"
    m.mark_consumed(geo + js)
    assert m.live_chunks(geo + js) == geo + js
    clock.t += 30
    (repo / "pkg" / "geometry.py").write_text((repo / "pkg" / "geometry.py").read_text() + "\n# edited\n")
    assert all(m.chunk_state(c) == "invalidated" for c in geo)  # at once, before the TTL
    assert m.live_chunks(js) == js
    clock.t += 31
    assert all(m.chunk_state(c) == "expired" for c in js)
    m.mark_consumed(js)  # handing them over again restarts the TTL
    assert m.live_chunks(js) == js


def test_audit_trail_export_is_versioned_json(repo, config, clock, chunks):
    db = repo / "elsewhere.sqlite"
    m = ContextManager(repo, config, ValidationSection(), db_path=db, clock=clock)
    snap = m.create_snapshot("task-7", chunks, {"schema_unchanged": False})
    m.validate(snap)
    v2 = m.verify_assumption(snap, "schema_unchanged", holds=True)
    m.mark_consumed(v2.chunks, task_id="task-7")
    m.close()
    reopened = ContextManager(repo, config, ValidationSection(), db_path=db, clock=clock)
    data = json.loads(json.dumps(reopened.export("task-7")))
    assert data["format"] == EXPORT_FORMAT and data["format_version"] == 2
    assert [v["version"] for v in data["versions"]] == [1, 2]
    assert [v["assumptions"]["schema_unchanged"]["holds"] for v in data["versions"]] == [False, True]
    assert [v["reason"] for v in data["versions"]] == ["initial", "initial"]
    kinds = [e["kind"] for e in data["events"]]
    assert kinds == ["created", "validated", "assumption_verified", "consumed"]
    assert data["events"][1]["detail"]["reasons"][0]["code"] == "unverified_assumptions"
    assert Snapshot.from_dict(data["versions"][1]) == v2
    assert db.exists() and not (repo / ".lagoon" / "context.sqlite").exists()


def test_complexity_counts_syntax_nodes_not_words(config):
    code = "def f(x):\n    if x:\n        return 1\n    for i in x:\n        pass\n"
    (chunk,) = chunk_file("a.py", code, 4096)
    assert complexity_score([chunk]) == 3  # def, if, for
    # Words in strings and comments are not syntax.
    (decoy,) = chunk_file("b.py", 'def g():\n    "class function if for while"  # class def\n', 4096)
    assert complexity_score([decoy]) == 1
    (js,) = chunk_file("c.js", "function h(a) { return a ? 1 : 2 }\n", 4096)
    assert complexity_score([js]) == 2
    assert complexity_score(chunk_file("n.txt", "if for while class\n", 4096)) == 0
