import subprocess
from pathlib import Path


def test_sums_verify():
    proc = subprocess.run(["sha256sum", "-c", "../SHA256SUMS"], cwd="/app/files", capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_file_listed_sorted():
    lines = Path("/app/SHA256SUMS").read_text().splitlines()
    paths = [line.split(None, 1)[1].lstrip("*") for line in lines]
    assert paths == ["./a.txt", "./b.txt", "./sub/c.txt"]
