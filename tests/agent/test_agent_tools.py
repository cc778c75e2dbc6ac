"""Tools: bash state and timeouts, view, edit messages and undo, confinement, the text parser."""

from __future__ import annotations

import os
import time

import pytest

from lagoon.agent.environment import LocalEnvironment, cut_output
from lagoon.agent.parser import ReplyFormatError, parse_actions
from lagoon.agent.tools import ToolBox, UnknownToolError
from lagoon.agent.tools.bash import BashTool
from lagoon.agent.tools.edit import EditTool
from lagoon.agent.tools.view import ViewTool
from lagoon.agent.workspace import Workspace
from lagoon.errors import WorkspaceError
from lagoon.protocols import ChatMessage, ToolCall


@pytest.fixture
def ws(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\ny = 2\nx = 1\nz = 3\n")
    return Workspace(tmp_path)


def test_bash_carries_cwd_and_exported_env_and_unset(tmp_path):
    env = LocalEnvironment(tmp_path)
    (tmp_path / "sub").mkdir()
    r = env.execute("cd sub && export GREETING='hello world' && unset HOME")
    assert r.exit_code == 0
    r = env.execute('pwd; echo "$GREETING"; echo "home=${HOME:-none}"')
    assert r.output.splitlines() == [str(tmp_path / "sub"), "hello world", "home=none"]
    assert env.state() == {"cwd": "sub", "env": {"GREETING": "hello world"}, "unset": ["HOME"]}
    fresh = LocalEnvironment(tmp_path)
    fresh.restore(env.state())
    assert fresh.execute('pwd; echo "$GREETING"').output.splitlines() == [str(tmp_path / "sub"), "hello world"]


def test_bash_exit_keeps_state_and_reports_code(tmp_path):
    env = LocalEnvironment(tmp_path)
    r = env.execute("export A=1; exit 7")
    assert r.exit_code == 7
    assert env.execute("echo $A").output.strip() == "1"


def test_bash_timeout_kills_the_process_group(tmp_path):
    env = LocalEnvironment(tmp_path)
    marker = tmp_path / "survived"
    start = time.monotonic()
    r = env.execute(f"(sleep 2; touch {marker}) & sleep 30", timeout_s=0.5)
    assert r.timed_out and r.exit_code == -9
    assert time.monotonic() - start < 10
    assert "timed out" in r.output
    time.sleep(2.5)
    assert not marker.exists(), "the background child outlived the timeout: the group was not killed"


def test_cwd_outside_workspace_is_reset(tmp_path):
    (tmp_path / "w").mkdir()
    env = LocalEnvironment(tmp_path / "w")
    env.execute("cd /")
    assert env.state()["cwd"] == "."


def test_long_output_keeps_head_and_tail(tmp_path):
    env = LocalEnvironment(tmp_path, max_output_chars=300)
    r = env.execute("echo START; seq 1 5000; echo END")
    assert r.truncated and len(r.output) < 400
    assert r.output.startswith("START") and r.output.rstrip().endswith("END")
    assert "characters cut" in r.output
    text, cut = cut_output("abc", 10)
    assert text == "abc" and not cut


def test_view_numbers_lines_and_ranges(ws):
    view = ViewTool(ws)
    out = view.run({"path": "pkg/a.py", "start_line": 2, "end_line": 3})
    assert out.text.splitlines()[1:3] == ["2\ty = 2", "3\tx = 1"]
    assert "[lines 2-3 of 4]" in out.text
    listing = view.run({"path": "."})
    assert "pkg/" in listing.text
    box = ToolBox([view])
    bad = box.run("view", {"path": "pkg/a.py", "start_line": 9})
    assert not bad.ok and "invalid" in bad.text
    missing = box.run("view", {"path": "pkg/nope.py"})
    assert not missing.ok and "does not exist" in missing.text


def test_edit_replace_miss_ambiguous_insert_create_undo(ws):
    edit = EditTool(ws)
    path = ws.root / "pkg" / "a.py"
    miss = edit.run({"command": "str_replace", "path": "pkg/a.py", "old_str": "q = 9", "new_str": "q = 1"})
    assert not miss.ok and "not found" in miss.text
    amb = edit.run({"command": "str_replace", "path": "pkg/a.py", "old_str": "x = 1", "new_str": "x = 5"})
    assert not amb.ok and "2 times" in amb.text and "lines 1, 3" in amb.text
    assert path.read_text() == "x = 1\ny = 2\nx = 1\nz = 3\n"
    ok = edit.run({"command": "str_replace", "path": "pkg/a.py", "old_str": "y = 2", "new_str": "y = 20"})
    assert ok.ok and "y = 20" in path.read_text()
    ins = edit.run({"command": "insert", "path": "pkg/a.py", "insert_line": 0, "new_str": "# head"})
    assert ins.ok and path.read_text().startswith("# head\nx = 1")
    created = edit.run({"command": "create", "path": "pkg/new.py", "file_text": "n = 1\n"})
    assert created.ok and (ws.root / "pkg/new.py").read_text() == "n = 1\n"
    again = edit.run({"command": "create", "path": "pkg/new.py", "file_text": "n = 2\n"})
    assert not again.ok and "already exists" in again.text
    edit.run({"command": "undo", "path": "pkg/new.py"})
    assert not (ws.root / "pkg/new.py").exists()
    edit.run({"command": "undo", "path": "pkg/a.py"})
    edit.run({"command": "undo", "path": "pkg/a.py"})
    assert path.read_text() == "x = 1\ny = 2\nx = 1\nz = 3\n"
    nothing = edit.run({"command": "undo", "path": "pkg/a.py"})
    assert not nothing.ok


def test_edit_history_survives_state_round_trip(ws):
    edit = EditTool(ws)
    edit.run({"command": "str_replace", "path": "pkg/a.py", "old_str": "z = 3", "new_str": "z = 4"})
    other = EditTool(ws)
    other.restore(edit.state())
    other.run({"command": "undo", "path": "pkg/a.py"})
    assert "z = 3" in (ws.root / "pkg/a.py").read_text()


@pytest.mark.parametrize("bad", ["../outside.txt", "/etc/passwd", "pkg/../../x", "link/secret", "dangling", ".lagoon/x"])
def test_paths_outside_the_workspace_are_refused(tmp_path, bad):
    root = tmp_path / "repo"
    root.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    os.symlink(outside, root / "link")
    os.symlink(tmp_path / "nowhere" / "file", root / "dangling")
    ws = Workspace(root)
    with pytest.raises(WorkspaceError):
        ws.resolve(bad)
    box = ToolBox([ViewTool(ws), EditTool(ws)])
    for name, args in (("view", {"path": bad}), ("edit", {"command": "create", "path": bad, "file_text": "x"})):
        out = box.run(name, args)
        assert not out.ok and "error" in out.text
    assert not (tmp_path / "nowhere").exists()
    assert (outside / "secret").read_text() == "s"


def test_symlink_inside_the_workspace_is_allowed(tmp_path):
    (tmp_path / "real.txt").write_text("r\n")
    os.symlink(tmp_path / "real.txt", tmp_path / "alias.txt")
    assert Workspace(tmp_path).resolve("alias.txt") == (tmp_path / "real.txt").resolve()


def test_toolbox_unknown_tool_and_bad_arguments(tmp_path):
    box = ToolBox([BashTool(LocalEnvironment(tmp_path))])
    with pytest.raises(UnknownToolError, match="bash"):
        box.run("rm_rf", {})
    out = box.run("bash", {"cmd": "ls"})
    assert not out.ok and "'command'" in out.text


def test_text_fallback_parser():
    calls, mode = parse_actions(ChatMessage("assistant", "Let me look.\n```bash\nls -la\n```\n"), 3)
    assert mode == "text" and calls[0].name == "bash" and calls[0].arguments == {"command": "ls -la"}
    calls, _ = parse_actions(ChatMessage("assistant", "done\n```\nsubmit\n```"), 4)
    assert calls[0].name == "submit"
    native = ChatMessage("assistant", "", tool_calls=(ToolCall("c1", "view", {"path": "a"}),))
    assert parse_actions(native, 1) == ([native.tool_calls[0]], "tools")
    for bad in ("no block here", "```bash\nls\n```\n```bash\npwd\n```", "```bash\n\n```"):
        with pytest.raises(ReplyFormatError, match="fenced block"):
            parse_actions(ChatMessage("assistant", bad), 1)


def test_os_errors_become_error_observations(ws):
    # a.py is a file, so creating pkg/a.py/x.py fails in the OS (NotADirectoryError), as root too
    out = ToolBox([EditTool(ws)]).run("edit", {"command": "create", "path": "pkg/a.py/x.py", "file_text": "x"})
    assert not out.ok and "edit failed" in out.text
    assert (ws.root / "pkg" / "a.py").read_text().startswith("x = 1")


def test_a_closing_fence_is_never_taken_for_an_opening_one():
    reply = "The code:\n```python\nx = 1\n```\nNow run:\n```bash\npython -m pytest -q\n```\n"
    calls, mode = parse_actions(ChatMessage("assistant", reply), 2)
    assert mode == "text" and calls[0].arguments == {"command": "python -m pytest -q"}
    # a reply that only repeats a python block holds no action at all
    with pytest.raises(ReplyFormatError, match="no fenced block"):
        parse_actions(ChatMessage("assistant", "```python\nx = 1\n```\n```python\ny = 2\n```"), 1)


def test_tool_calls_written_as_text_in_either_family_syntax():
    smol = '<tool_call>[{"name": "bash", "arguments": {"command": "ls"}}]</tool_call>'
    hermes = '<tool_call>\n{"name": "view", "arguments": {"path": "a.py"}}\n</tool_call>'
    for text, want in ((smol, ("bash", {"command": "ls"})), (hermes, ("view", {"path": "a.py"}))):
        calls, mode = parse_actions(ChatMessage("assistant", text), 5)
        assert mode == "tools" and [(c.name, dict(c.arguments)) for c in calls] == [want]
        assert calls[0].id == "text-5-0"


def test_search_k_out_of_range_is_an_observation_not_a_crash(tmp_path):
    from lagoon.agent.tools.search import MAX_K, SearchTool
    from lagoon.testing import WholeFileRetriever

    (tmp_path / "a.py").write_text("x = 1\n")
    box = ToolBox([SearchTool(WholeFileRetriever(tmp_path))])
    for bad in ("abc", [1], 0, -3, MAX_K + 1, 2.5, True):
        out = box.run("search", {"query": "x", "k": bad})
        assert not out.ok and f"k must be an integer from 1 to {MAX_K}" in out.text
    for good in (1, "2", None):
        assert box.run("search", {"query": "x", "k": good}).ok


def test_arguments_that_are_not_valid_unicode_are_an_observation(ws, tmp_path):
    box = ToolBox([ViewTool(ws), EditTool(ws), BashTool(LocalEnvironment(tmp_path))])
    for name, args in (("view", {"path": "\ud800"}), ("bash", {"command": "echo \ud800"}),
                       ("edit", {"command": "create", "path": "n.py", "file_text": "x = '\udfff'"})):
        out = box.run(name, args)
        assert not out.ok and "not valid Unicode" in out.text
    assert not (ws.root / "n.py").exists()
