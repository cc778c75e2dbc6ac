"""Every tool result, and its metadata, is capped: a 20 MB one-line file cannot flood a session."""

from __future__ import annotations

import json
import shutil
import sqlite3
from pathlib import Path

from lagoon.agent import run_task
from lagoon.agent.tools import ToolBox, ToolOutput
from lagoon.agent.tools.edit import EditTool
from lagoon.agent.tools.view import MAX_LINE_CHARS, ViewTool
from lagoon.agent.workspace import Workspace
from lagoon.config import load_config
from lagoon.protocols import ToolSpec
from lagoon.testing import FileHashSnapshots, ReplayChatModel, ScriptStep, WholeFileRetriever

SAMPLE = Path(__file__).parents[2] / "examples" / "sample-repo"
BIG = 20 * 1024 * 1024


def _big_line_file(root: Path) -> Path:
    path = root / "big.txt"
    # one line, 20 MB, with a unique token near the end for edit to find
    path.write_text("ab" * (BIG // 2 - 8) + "NEEDLE" + "cd\n", encoding="utf-8")
    return path


def test_a_20_mb_line_viewed_and_edited_in_a_run_stores_at_most_the_cap(tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(SAMPLE, repo, ignore=shutil.ignore_patterns("__pycache__", ".pytest_cache", ".lagoon"))
    _big_line_file(repo)
    cap = 3000
    model = ReplayChatModel([
        ScriptStep(tool=("view", {"path": "big.txt"})),
        ScriptStep(tool=("edit", {"command": "str_replace", "path": "big.txt", "old_str": "NEEDLE",
                                  "new_str": "THREAD"})),
        ScriptStep(tool=("submit", {"summary": "done"})),
    ])
    cfg = load_config({"context": {"rerank": False}, "agent": {"max_output_chars": cap}})
    r = run_task("look at big.txt", repo, cfg, model=model, retriever=WholeFileRetriever(repo),
                 snapshot_manager=FileHashSnapshots(repo))
    assert r.submitted
    assert "THREAD" in (repo / "big.txt").read_text()[-20:]  # the edit itself was not cut
    db = sqlite3.connect(repo / ".lagoon" / "sessions.db")
    try:
        payloads = [json.loads(p) for (p,) in db.execute("SELECT payload FROM events WHERE kind='tool_result'")]
    finally:
        db.close()
    assert [p["name"] for p in payloads] == ["view", "edit", "submit"]
    for p in payloads:
        assert len(p["text"]) <= cap
        for value in p["meta"].values():
            assert not isinstance(value, str) or len(value) <= cap
    assert "more characters on this line" in payloads[0]["text"]
    assert len(payloads[0]["meta"]["file_state"]) <= cap
    # the prompt, the session database and the trajectory stay small too
    assert max(len(m.content) for req in model.requests for m in req) < 4 * cap + 4000
    assert Path(r.trajectory).stat().st_size < 200_000
    assert (repo / ".lagoon" / "sessions.db").stat().st_size < 2_000_000


def test_view_stops_at_the_character_budget_and_says_where_to_continue(tmp_path):
    lines = [f"line {i} " + "x" * 90 for i in range(1, 301)]
    (tmp_path / "f.txt").write_text("\n".join(lines) + "\n")
    out = ViewTool(Workspace(tmp_path), max_chars=2000).run({"path": "f.txt"})
    assert len(out.text) <= 2000 and out.meta["file_state"] == out.text
    shown = [ln for ln in out.text.splitlines()[1:] if "\t" in ln]
    last = int(shown[-1].split("\t")[0])
    assert 10 < last < 25 and f"continue with start_line={last + 1}" in out.text
    assert shown[-1].split("\t")[1] == lines[last - 1]  # whole lines only, never a half one
    again = ViewTool(Workspace(tmp_path), max_chars=2000).run({"path": "f.txt", "start_line": last + 1})
    assert again.text.splitlines()[1].split("\t")[1] == lines[last]


def test_edit_snippet_and_match_list_are_bounded(tmp_path):
    path = _big_line_file(tmp_path)
    size = path.stat().st_size
    edit = EditTool(Workspace(tmp_path))
    ok = edit.run({"command": "str_replace", "path": "big.txt", "old_str": "NEEDLE", "new_str": "THREAD"})
    assert ok.ok and len(ok.text) < 1000 and ok.meta["file_state"] == ok.text
    assert path.stat().st_size == size and "THREAD" in path.read_text()[-20:]
    assert "no undo kept" in ok.text and edit.state() == {"history": {}}  # no 20 MB copy in the session
    many = edit.run({"command": "str_replace", "path": "big.txt", "old_str": "abab", "new_str": "x"})
    assert not many.ok and "…" in many.text and len(many.text) < 1000


class _Flood:
    name = "flood"
    spec = ToolSpec(name="flood", description="floods", parameters={"type": "object", "properties": {}})

    def run(self, arguments):
        return ToolOutput(text="t" * 10**6, meta={"file_state": "s" * 10**6, "nested": {"deep": ["d" * 10**6]},
                                                   "n": 3})


def test_toolbox_caps_text_and_every_string_in_meta():
    out = ToolBox([_Flood()], max_chars=500).run("flood", {})
    assert len(out.text) <= 500 and "characters cut" in out.text
    assert len(out.meta["file_state"]) <= 500 and len(out.meta["nested"]["deep"][0]) <= 500
    assert out.meta["n"] == 3
    assert MAX_LINE_CHARS < 10000
