"""Session store: sequence numbers, append-only events, locks, tool state, secrets, export."""

from __future__ import annotations

import sqlite3

import pytest

from lagoon.agent.redaction import Redactor
from lagoon.agent.session import SessionStore, session_id_for
from lagoon.errors import SessionError, WorkspaceError


@pytest.fixture
def store(tmp_path):
    s = SessionStore.for_workspace(tmp_path)
    yield s
    s.close()


def test_session_id_is_deterministic(tmp_path):
    assert session_id_for(tmp_path, "fix it") == session_id_for(tmp_path, " fix it ")
    assert session_id_for(tmp_path, "fix it") != session_id_for(tmp_path, "fix that")
    assert session_id_for(tmp_path / "a", "fix it") != session_id_for(tmp_path / "b", "fix it")


def test_events_get_gapless_sequence_numbers_and_are_append_only(store):
    assert store.open("s1", "/r", "task") is False
    seqs = [store.append("s1", "model", {"i": i}) for i in range(5)]
    assert seqs == [1, 2, 3, 4, 5]
    assert [e["payload"]["i"] for e in store.events("s1")] == list(range(5))
    store.open("s2", "/r", "other")
    assert store.append("s2", "task", {}) == 1
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("UPDATE events SET kind='x' WHERE seq=1")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        store.db.execute("DELETE FROM events")
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_reopen_is_a_resume_and_unknown_session_names_known_ones(store):
    store.open("s1", "/r", "task")
    store.set_status("s1", "crashed")
    assert store.open("s1", "/r", "task") is True
    with pytest.raises(SessionError, match="s1"):
        store.get("missing")


def test_session_owned_by_a_live_process_is_refused(store):
    store.open("s1", "/r", "task")
    store.db.execute("UPDATE sessions SET owner_pid=1 WHERE id='s1'")  # pid 1 is always alive
    with pytest.raises(SessionError, match="in use"):
        store.open("s1", "/r", "task")


def test_locks_block_other_live_sessions_only(store):
    store.open("a", "/r", "t1")
    store.open("b", "/r", "t2")
    store.acquire_lock("a", "src/x.py")
    store.acquire_lock("a", "src/x.py")  # re-entrant
    store.db.execute("UPDATE sessions SET owner_pid=1 WHERE id='a'")
    with pytest.raises(WorkspaceError, match="locked by session a"):
        store.acquire_lock("b", "src/x.py")
    store.acquire_lock("b", "src/y.py")
    assert store.locks() == {"src/x.py": "a", "src/y.py": "b"}
    store.release_locks("a")
    store.acquire_lock("b", "src/x.py")
    assert store.locks("b") == {"src/x.py": "b", "src/y.py": "b"}


def test_secrets_never_reach_the_database(tmp_path):
    secret = "sk-test-DO-NOT-STORE-4242"
    red = Redactor({"OPENAI_API_KEY": secret, "HOME": "/root"})
    store = SessionStore(tmp_path / "s.db", redactor=red)
    store.open("s", "/r", f"use key {secret}")
    store.append("s", "tool_result", {"text": f"key={secret}", "nested": [{"v": secret}]})
    store.record_command("s", 1, f"echo {secret}", 0, 0.1, secret)
    store.save_tool_state("s", {"bash": {"env": {"X": secret}}})
    store.record_snapshot("s", 1, {"note": secret})
    store.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir())
    assert secret.encode() not in raw
    assert b"[REDACTED:OPENAI_API_KEY]" in raw


def test_export_holds_every_event_in_order(store):
    store.open("s", "/r", "t")
    for kind in ("task", "context", "model", "tool_intent", "tool_result", "exit"):
        store.append("s", kind, {"k": kind})
    store.save_tool_state("s", {"bash": {"cwd": "."}})
    assert store.load_tool_state("s") == {"bash": {"cwd": "."}}
    doc = store.export("s")
    assert doc["format_version"] == 1
    assert [e["seq"] for e in doc["events"]] == [1, 2, 3, 4, 5, 6]
    assert [e["kind"] for e in doc["events"]][-1] == "exit"


def test_corrupt_database_is_a_session_error(tmp_path):
    bad = tmp_path / "s.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(SessionError, match="move it aside"):
        SessionStore(bad)


def test_edit_tool_refuses_a_file_another_live_session_holds(tmp_path):
    from lagoon.agent.session import SessionLocks
    from lagoon.agent.tools import ToolBox
    from lagoon.agent.tools.edit import EditTool
    from lagoon.agent.workspace import Workspace

    (tmp_path / "f.py").write_text("a = 1\n")
    store = SessionStore.for_workspace(tmp_path)
    store.open("a", str(tmp_path), "t1")
    store.open("b", str(tmp_path), "t2")
    ws = Workspace(tmp_path)
    box_a = ToolBox([EditTool(ws, SessionLocks(store, "a"))])
    box_b = ToolBox([EditTool(ws, SessionLocks(store, "b"))])
    assert box_a.run("edit", {"command": "str_replace", "path": "f.py", "old_str": "a = 1", "new_str": "a = 2"}).ok
    store.db.execute("UPDATE sessions SET owner_pid=1 WHERE id='a'")  # session a is alive elsewhere
    out = box_b.run("edit", {"command": "str_replace", "path": "f.py", "old_str": "a = 2", "new_str": "a = 3"})
    assert not out.ok and "locked by session a" in out.text
    assert (tmp_path / "f.py").read_text() == "a = 2\n"
    store.close()


def test_agent_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys, lagoon.agent, lagoon.cli.agent_cmd, lagoon.agent.runner; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_batch_commits_all_its_writes_or_none(store, tmp_path):
    store.open("s1", "/r", "task")
    store.append("s1", "tool_intent", {"step": 1, "call_id": "c1"})
    with pytest.raises(RuntimeError), store.batch():
        store.record_command("s1", 1, "ls", 0, 0.1, "out")
        store.save_tool_state("s1", {"cwd": "/r"})
        store.append("s1", "tool_result", {"step": 1, "call_id": "c1"})
        raise RuntimeError("killed between the writes")
    assert [e["kind"] for e in store.events("s1")] == ["tool_intent"]
    assert store.terminal("s1") == [] and store.load_tool_state("s1") is None
    with store.batch():
        store.record_command("s1", 1, "ls", 0, 0.1, "out")
        with store.batch():  # nested: still the one transaction
            store.save_tool_state("s1", {"cwd": "/r"})
        assert store.append("s1", "tool_result", {"step": 1, "call_id": "c1"}) == 2
    other = SessionStore.for_workspace(tmp_path)  # a second connection sees all three
    try:
        assert [e["kind"] for e in other.events("s1")] == ["tool_intent", "tool_result"]
        assert len(other.terminal("s1")) == 1 and other.load_tool_state("s1") == {"cwd": "/r"}
    finally:
        other.close()
