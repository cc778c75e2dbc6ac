"""LocalEnvironment under hostile commands: bounded memory and output, byte cap, no state left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from lagoon.agent.environment import LocalEnvironment, cut_output

_RSS_PROBE = textwrap.dedent("""
    import json, resource, sys
    from lagoon.agent.environment import LocalEnvironment
    root, limit, cap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with LocalEnvironment(root, max_output_chars=limit, max_read_bytes=cap) as env:
        r = env.execute("echo START; yes | head -c 300000000; echo; echo END")
    # VmHWM: this process image's peak RSS (ru_maxrss would include the forked pytest before exec)
    hwm = [ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:")]
    peak_kb = int(hwm[0].split()[1]) if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_mb": peak_kb / 1024,
                      "output": r.output, "exit_code": r.exit_code, "truncated": r.truncated}))
""")


def _probe(tmp_path, limit: int, cap: int) -> dict:
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath(src), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", _RSS_PROBE, str(tmp_path), str(limit), str(cap)],
                          capture_output=True, text=True, timeout=120, env=env, check=True)
    return json.loads(done.stdout)


def test_300_mb_of_output_keeps_memory_and_storage_bounded(tmp_path):
    # a fresh process, so the peak is this command's and not pytest's
    got = _probe(tmp_path, 10000, 10**9)  # cap above 300 MB: everything flows through the ring buffer
    assert got["peak_mb"] < 200, f"peak RSS {got['peak_mb']:.0f} MB while reading 300 MB of output"
    assert got["exit_code"] == 0 and got["truncated"]
    out = got["output"]
    assert len(out) <= 10000
    assert out.startswith("START\ny\n") and out.rstrip().endswith("y\n\nEND")
    assert "more bytes; showing head and tail" in out


def test_output_past_the_byte_cap_stops_the_command_and_its_group(tmp_path):
    env = LocalEnvironment(tmp_path, max_output_chars=500, max_read_bytes=1 << 20)
    marker = tmp_path / "survived"
    start = time.monotonic()
    r = env.execute(f"(sleep 2; touch {marker}) & yes")  # `yes` never ends on its own
    assert time.monotonic() - start < 10
    assert r.exit_code == -9 and r.truncated and not r.timed_out
    assert len(r.output) <= 500
    assert "stopped after printing more than 1048576 bytes" in r.output
    time.sleep(2.5)
    assert not marker.exists(), "a child outlived the byte cap: the group was not killed"
    env.close()


@pytest.mark.parametrize("limit", [200, 201, 333, 1000, 10000])
def test_cut_output_never_exceeds_the_limit(limit):
    for n in (limit - 1, limit, limit + 1, 3 * limit, 10**6):
        text = "".join(chr(0x61 + i % 26) for i in range(n))
        cut, was_cut = cut_output(text, limit)
        assert len(cut) <= limit
        assert was_cut == (n > limit)
        if was_cut:
            head, tail = cut.split("\n[... ", 1)[0], cut.rsplit("...]\n", 1)[1]
            assert text.startswith(head) and text.endswith(tail) and len(head) > limit // 4
            assert f"{n - len(head) - len(tail)} characters cut" in cut
    dropped, _ = cut_output("short", 200, dropped=5000)
    assert "5000 more bytes" in dropped and len(dropped) <= 200


def test_multibyte_output_is_kept_whole_when_it_fits(tmp_path):
    env = LocalEnvironment(tmp_path, max_output_chars=200)
    r = env.execute("printf 'é%.0s' $(seq 150)")
    assert r.output == "é" * 150 and not r.truncated
    env.close()


def test_shell_state_files_do_not_outlive_the_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LAGOON_PROBE_VALUE", "not-a-secret-name-but-still-private")
    env = LocalEnvironment(tmp_path)
    r = env.execute("export EXTRA=1; echo hi")
    assert r.output.strip() == "hi" and env.state()["env"] == {"EXTRA": "1"}
    assert list(env._state_dir.iterdir()) == []  # `env -0` wrote every variable: it must be gone
    folder = env._state_dir
    env.close()
    env.close()  # twice is fine
    assert not folder.exists()


def test_an_environment_never_closed_still_removes_its_folder(tmp_path):
    import gc

    env = LocalEnvironment(tmp_path)
    env.execute("true")
    folder = env._state_dir
    assert folder.is_dir()
    del env
    gc.collect()
    assert not folder.exists()
