"""`lagoon run` leaves nothing behind: no lagoon-env-* folder after a normal exit, an error or
Ctrl-C, and no environment secret in any file it wrote."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SECRET = "sk-probe-5f1e2d3c4b5a69788796a5b4"
SRC = Path(__file__).parents[2] / "src"


def _start(tmp_path: Path, script: list, *extra: str) -> tuple[subprocess.Popen, Path, Path]:
    repo, tmp = tmp_path / "repo", tmp_path / "tmp"
    repo.mkdir()
    tmp.mkdir()
    (repo / "a.txt").write_text("alpha\n")
    (tmp_path / "s.json").write_text(json.dumps(script))
    env = {**os.environ, "TMPDIR": str(tmp), "LAGOON_PROBE_API_KEY": SECRET,
           "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])}
    lagoon = Path(sys.executable).parent / "lagoon"
    proc = subprocess.Popen([str(lagoon), "run", "probe", "--repo", str(repo), "--json",
                             "--model", f"scripted:{tmp_path / 's.json'}", "-c", "context.rerank=false", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, repo, tmp


def _assert_clean(repo: Path, tmp: Path) -> None:
    assert not list(tmp.glob("lagoon-env-*")), f"left behind: {list(tmp.iterdir())}"
    written = [p for p in [*repo.rglob("*"), *tmp.rglob("*")] if p.is_file()]
    assert any(p.name == "sessions.db" for p in written)
    for p in written:
        assert SECRET.encode() not in p.read_bytes(), f"the secret is in {p}"


COMMANDS = [  # each shows the secret a different way: echo, the whole environment, an exported copy
    {"bash": 'echo "key=$LAGOON_PROBE_API_KEY"; env | sort | head -c 20000'},
    {"bash": f"export COPY_OF_IT={SECRET}; echo {SECRET}; env -0 | tr '\\0' '\\n' | grep -c ="},
]


def test_normal_exit_leaves_no_env_folder_and_no_secret(tmp_path):
    proc, repo, tmp = _start(tmp_path, [*COMMANDS, {"tool": ["submit", {"summary": "done"}]}])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert json.loads(out)["submitted"]
    _assert_clean(repo, tmp)


def test_error_exit_leaves_no_env_folder(tmp_path):
    proc, repo, tmp = _start(tmp_path, COMMANDS)  # the script runs out: the model raises mid-run
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "ran out of replies" in err
    _assert_clean(repo, tmp)


@pytest.mark.skipif(sys.platform != "linux", reason="signals to a child process")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_during_a_command_leaves_no_env_folder_and_no_process(tmp_path, sig):
    marker = tmp_path / "started"
    survived = tmp_path / "survived"
    proc, repo, tmp = _start(tmp_path, [{"bash": f"touch {marker}; sleep 30; touch {survived}"}])
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode != 0
    assert not list(tmp.glob("lagoon-env-*")), err
    saved = list((repo / ".lagoon" / "trajectories").glob("*.json"))  # the finally ran: trajectory saved
    assert len(saved) == 1 and json.loads(saved[0].read_text())["events"]
    time.sleep(0.2)
    assert not survived.exists()
    _assert_clean(repo, tmp)
