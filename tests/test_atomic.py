"""`lagoon.atomic`: the target holds the old content or the new one, never a half; no temp file is left."""

import os

import pytest

from lagoon.atomic import atomic_path, write_atomic, write_json_atomic


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json_atomic(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n'
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed midway")
    assert target.read_text() == '{\n  "a": 1\n}\n'
    assert sorted(p.name for p in target.parent.iterdir()) == ["out.json"]


def test_keep_mode_and_exact_bytes(tmp_path):
    script = tmp_path / "run.sh"
    script.write_text("old\n")
    os.chmod(script, 0o755)
    write_atomic(script, "echo hi\r\n", keep_mode=True)
    assert script.read_bytes() == b"echo hi\r\n" and script.stat().st_mode & 0o777 == 0o755
    write_atomic(tmp_path / "b.bin", b"\x00\x01")
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
