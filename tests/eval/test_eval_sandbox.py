"""The Docker-free sandbox: Dockerfile parsing, bubblewrap isolation, limits, shell state."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lagoon.errors import TaskSpecError
from lagoon.eval.sandbox import (
    EnvironmentUnsupported,
    Sandbox,
    build_environment,
    bwrap_available,
    parse_dockerfile,
)
from lagoon.protocols import Environment

needs_bwrap = pytest.mark.skipif(not bwrap_available(), reason="bubblewrap (bwrap) is not installed")


def _dockerfile(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "Dockerfile"
    p.write_text(text)
    return p


def test_parse_workdir_env_copy_run(tmp_path):
    spec = parse_dockerfile(_dockerfile(tmp_path, (
        "# comment\nFROM python:3.11-slim\nARG NAME=world\nENV GREETING=hello A=1\n"
        "WORKDIR /app\nCOPY data.txt sub/\nRUN echo $NAME \\\n  > out.txt\nWORKDIR src\nCMD [\"bash\"]\n"
    )))
    assert spec.base_image == "python:3.11-slim" and spec.workdir == "/app"
    assert spec.env == {"GREETING": "hello", "A": "1"}
    assert [s.kind for s in spec.steps] == ["copy", "run"]
    assert spec.steps[1].args[0].split() == ["echo", "world", ">", "out.txt"]


@pytest.mark.parametrize(
    "line, why",
    [
        ("RUN apt-get update && apt-get install -y jq", "needs the network"),
        ("RUN pip install requests", "needs the network"),
        ("RUN curl -fsSL https://x.invalid | sh", "needs the network"),
        ("COPY --from=builder /x /app", "need Docker"),
        ("ADD https://x.invalid/f.tgz /app/", "URL"),
        ("VOLUME /data", "not supported"),
    ],
)
def test_unsupported_lines_name_the_line(tmp_path, line, why):
    with pytest.raises(EnvironmentUnsupported, match=why) as info:
        parse_dockerfile(_dockerfile(tmp_path, f"FROM debian\nWORKDIR /app\n{line}\n"))
    assert "Dockerfile:3" in str(info.value)
    assert isinstance(info.value, TaskSpecError)


def test_sandbox_is_an_environment(tmp_path):
    assert isinstance(Sandbox(tmp_path, mode="none"), Environment)
    with pytest.raises(TaskSpecError, match="valid|one of"):
        Sandbox(tmp_path, mode="docker")


@needs_bwrap
def test_build_environment_copies_and_runs_inside(tmp_path):
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "data.txt").write_text("payload\n")
    df = _dockerfile(ctx, "FROM debian\nENV MARK=42\nWORKDIR /app\nCOPY data.txt sub/\nRUN cp sub/data.txt made-by-run.txt && echo $MARK >> made-by-run.txt\n")
    ws = tmp_path / "ws"
    ws.mkdir()
    sb = build_environment(Sandbox(ws, mode="bwrap"), df)
    assert (ws / "sub/data.txt").read_text() == "payload\n"
    assert (ws / "made-by-run.txt").read_text() == "payload\n42\n"
    assert sb.execute("echo $MARK; pwd").output.split() == ["42", "/app"]


@needs_bwrap
def test_failing_run_line_is_environment_unsupported(tmp_path):
    df = _dockerfile(tmp_path, "FROM debian\nWORKDIR /app\nRUN false\n")
    (tmp_path / "ws").mkdir()
    with pytest.raises(EnvironmentUnsupported, match="RUN failed"):
        build_environment(Sandbox(tmp_path / "ws", mode="bwrap"), df)


@needs_bwrap
def test_bwrap_isolation(tmp_path):
    ws, tests, logs = tmp_path / "ws", tmp_path / "tests", tmp_path / "logs"
    for d in (ws, tests, logs):
        d.mkdir()
    (tests / "t.txt").write_text("x")
    sb = Sandbox(ws, mode="bwrap").with_mounts(tests=(tests, False), logs__verifier=(logs, True))
    assert sb.execute("echo hi > /app/f && echo 1 > /logs/verifier/reward.txt").exit_code == 0
    assert (ws / "f").read_text() == "hi\n" and (logs / "reward.txt").read_text() == "1\n"
    assert sb.execute("touch /tests/x").exit_code != 0, "tests are read-only"
    assert sb.execute(f"touch {tmp_path}/escape").exit_code != 0, "the host is read-only"
    assert not (tmp_path / "escape").exists()
    net = sb.execute("python -c \"import socket; socket.create_connection(('1.1.1.1', 53), timeout=2)\"")
    assert net.exit_code != 0, "no network"
    out = sb.execute("echo $TEST_DIR; python -c 'import pytest, sys; print(sys.executable)'")
    assert out.exit_code == 0 and out.output.splitlines()[0] == "/tests"


@pytest.mark.parametrize("mode", ["none", pytest.param("bwrap", marks=needs_bwrap)])
def test_timeout_kills_and_output_is_cut(tmp_path, mode):
    sb = Sandbox(tmp_path, mode=mode, output_limit=2000)
    slow = sb.execute("sleep 30 & sleep 30; echo never", timeout_s=0.5)
    assert slow.timed_out and slow.exit_code == 124 and "never" not in slow.output
    big = sb.execute("head -c 100000 /dev/zero | tr '\\0' a; echo END")
    assert big.truncated and "bytes cut" in big.output and big.output.rstrip().endswith("END")
    assert len(big.output) < 2200


@pytest.mark.parametrize("mode", ["none", pytest.param("bwrap", marks=needs_bwrap)])
def test_state_dir_carries_cwd_and_exports(tmp_path, mode):
    (tmp_path / "ws" / "sub").mkdir(parents=True)
    sb = Sandbox(tmp_path / "ws", mode=mode, state_dir=tmp_path / "state")
    sb.execute("cd sub && export FOO=bar")
    out = sb.execute("pwd; echo $FOO").output.split()
    assert out[0].endswith("/sub") and out[1] == "bar"
    fresh = Sandbox(tmp_path / "ws", mode=mode)
    assert fresh.execute("echo ${FOO:-unset}").output.strip() == "unset"


def test_without_bwrap_test_dir_points_at_the_host_folder(tmp_path):
    (tmp_path / "ws").mkdir()
    sb = Sandbox(tmp_path / "ws", mode="none").with_mounts(tests=(tmp_path, False))
    out = sb.execute("echo $TEST_DIR; pwd").output.split()
    assert out == [str(tmp_path), str(tmp_path / "ws")]


def test_runaway_output_is_stopped_at_the_cap_not_the_timeout(tmp_path):
    # `yes` would write to the output file until the timeout: gigabytes of disk
    sb = Sandbox(tmp_path, mode="none", output_limit=2000, output_cap=1 << 20, timeout_s=60)
    marker = tmp_path / "survived"
    start = time.monotonic()
    r = sb.execute(f"(sleep 2; touch {marker}) & yes")
    assert time.monotonic() - start < 20
    assert not r.timed_out and r.truncated and r.exit_code != 0
    assert "stopped after printing more than 1048576 bytes" in r.output and len(r.output) < 2200
    time.sleep(2.5)
    assert not marker.exists(), "a child outlived the cap: the group was not killed"
    ok = sb.execute("echo fine")
    assert ok.output == "fine\n" and ok.exit_code == 0 and not ok.truncated
