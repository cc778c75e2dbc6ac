"""ContextGate's fast path over the real lagoon.context: after one full validation, unchanged files
(by stat, else by hash) skip the manager; any content change, a deletion or an old snapshot goes
to the manager, whose verdict stands — checked against the manager on random edit sequences."""

from __future__ import annotations

import os
import random
import shutil
import time
from pathlib import Path

import pytest

from lagoon.agent.context_gate import ContextGate, context_file_hash
from lagoon.config import load_config

SAMPLE = Path(__file__).parents[2] / "examples" / "sample-repo"
CFG = load_config({"context": {"rerank": False}})


class CountingManager:
    """The real ContextManager, counting the validations asked of it."""

    def __init__(self, inner) -> None:
        self.inner, self.validations = inner, 0

    def create_snapshot(self, task_id, chunks, assumptions=(), *, reason="initial"):
        return self.inner.create_snapshot(task_id, chunks, assumptions, reason=reason)

    def mark_consumed(self, chunks, task_id=None):
        self.inner.mark_consumed(chunks, task_id)

    def invalidate_files(self, paths):
        self.inner.invalidate_files(paths)

    def validate(self, snapshot):
        self.validations += 1
        return self.inner.validate(snapshot)


@pytest.fixture
def gate(tmp_path):
    from lagoon.context import CodeRetriever, ContextManager

    repo = tmp_path / "repo"
    shutil.copytree(SAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", ".lagoon"))
    old = time.time() - 3600  # files older than the racy window, as in a real checkout
    for p in repo.rglob("*"):
        os.utime(p, (old, old))
    inner = ContextManager(repo, CFG.context, CFG.validation)
    manager = CountingManager(inner)
    g = ContextGate("median of an even list textstats", task_id="t", manager=manager, k=5,
                    retriever=CodeRetriever(repo, CFG.context), root=repo,
                    file_hash=context_file_hash(repo, CFG.context, CFG.agent.state_dir), fresh_for_s=300.0)
    g.start()
    assert g.chunks, "the sample task retrieves code"
    yield g, manager, repo
    inner.close()


def test_unchanged_files_skip_the_manager_after_one_full_validation(gate):
    g, manager, repo = gate
    for _ in range(20):
        assert g.check().ok
    assert manager.validations == 1 == g.full_validations
    # touched but identical: the stat changed, the hash did not — still no validation
    path = repo / g.chunks[0].path
    os.utime(path)
    assert g.check().ok and manager.validations == 1


def test_same_size_edit_with_mtime_restored_is_caught(gate):
    g, manager, repo = gate
    assert g.check().ok
    path = repo / g.chunks[0].path
    st = path.stat()
    text = path.read_text()
    path.write_text(text[:-1] + ("X" if text[-1] != "X" else "Y"))  # same size
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime: only ctime and content differ
    r = g.check()
    assert r.refreshed and r.version == 2 and r.failures[0]["reasons"][0].startswith("source_changed")
    # the file's assumption caught it before the manager was asked: only the new version's validation
    assert manager.validations == 2 and r.drift[0].name == f"file:{g.chunks[0].path}"


def test_an_old_snapshot_goes_to_the_manager(gate):
    g, manager, _ = gate
    g.fresh_for_s = 0.5  # within a second of going stale: never the fast path
    for _ in range(3):
        g.check()
    assert manager.validations == 3


def test_fast_path_agrees_with_the_manager_on_random_edit_sequences(gate):
    g, manager, repo = gate
    rng = random.Random(7)
    verdicts = []
    originals = {p: (repo / p).read_text() for p in {c.path for c in g.chunks}}
    for _ in range(40):
        path = rng.choice(sorted(originals))
        op = rng.choice(["none", "touch", "edit", "revert", "delete"])
        target = repo / path
        if op == "touch" and target.exists():
            os.utime(target)
        elif op == "edit":
            target.write_text(originals[path] + f"\n# {rng.random()}\n")
        elif op in ("revert", "delete"):
            target.write_text(originals[path])
            if op == "delete":
                target.unlink()
        expected = manager.inner.validate(g.snapshot).ok  # the manager's verdict on the current snapshot
        r = g.check()
        assert (not r.failures) == expected, (op, path)
        verdicts.append(expected)
        if not target.exists():
            target.write_text(originals[path])
            g.check()
    assert verdicts.count(True) > 5 and verdicts.count(False) > 5
