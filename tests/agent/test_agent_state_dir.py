"""`agent.state_dir` must be a folder inside the repository, not its root: refused otherwise,
naming the key and the fix (in the config, and at run time for symlinks)."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from lagoon.agent.workspace import Workspace
from lagoon.cli.app import app
from lagoon.config import load_config
from lagoon.errors import ConfigError, WorkspaceError

BAD = {".": "repository root", "./": "repository root", "..": "'..'", "../state": "'..'",
       "a/../../x": "'..'", "a/..": "'..'", "/tmp/state": "absolute", "~/state": "absolute",
       "C:\\state": "absolute", " .lagoon": "spaces", "": "spaces"}


@pytest.mark.parametrize("value", list(BAD))
def test_state_dir_outside_or_at_the_root_is_refused(value):
    with pytest.raises(ConfigError) as err:
        load_config({"agent": {"state_dir": value}})
    text = str(err.value)
    assert "agent.state_dir" in text and BAD[value] in text and "'.lagoon'" in text


@pytest.mark.parametrize("value,kept", [(".lagoon", ".lagoon"), ("./state/", "state"), ("a/./b", "a/b")])
def test_relative_folders_inside_are_kept(value, kept):
    assert load_config({"agent": {"state_dir": value}}).agent.state_dir == kept


def test_symlinked_state_dir_leading_out_is_refused_at_run_time(tmp_path):
    repo, outside = tmp_path / "repo", tmp_path / "outside"
    repo.mkdir()
    outside.mkdir()
    os.symlink(outside, repo / ".lagoon")
    with pytest.raises(WorkspaceError, match="agent.state_dir '.lagoon' resolves to .* not a folder inside"):
        Workspace(repo)
    os.symlink(repo / "real-state", repo / "st")
    ws = Workspace(repo, "st")  # a link that stays inside is fine, and its target is protected
    with pytest.raises(WorkspaceError, match="state folder"):
        ws.resolve("real-state/sessions.db")


def test_lagoon_run_refuses_it_in_one_line(tmp_path):
    script = tmp_path / "s.json"
    script.write_text(json.dumps([{"tool": ["submit", {"summary": "x"}]}]))
    res = CliRunner().invoke(app, ["run", "t", "--repo", str(tmp_path), "--model", f"scripted:{script}",
                                   "-c", "agent.state_dir=../elsewhere"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "agent.state_dir" in lines[0] and "'..'" in lines[0]
    assert not (tmp_path.parent / "elsewhere").exists()
