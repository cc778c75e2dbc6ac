"""`LocalEnvironment`: runs the agent's shell commands in the workspace, one subprocess each.

Each command is its own `bash -c` process (a long-lived shell proved flaky elsewhere), started in
its own process group with stdin closed and stdout+stderr merged. State a shell would keep is
carried across commands instead: an EXIT trap writes the final `pwd` and `env -0` to a private
temp folder, and the next command starts in that folder with that environment. `state()` /
`restore()` move that state in and out of the session store (`agent.persist_tool_state`).

Output is read as it comes, never whole: the first bytes are kept, later ones go through a tail
ring buffer, so memory stays a few times `max_output_chars` however much a command prints. What is
stored is at most `max_output_chars` characters (head and tail with the cut marked). A timeout, or
output past `max_read_bytes` (a runaway `yes` or `cat /dev/urandom`), kills the whole process group.
Secret-looking variables are removed from the environment commands see, and the shell's state files
are deleted as soon as they are read (they hold the command's whole environment).

This is *not* a sandbox: commands run with the user's rights and may `cd` anywhere (a cwd outside
the workspace is reset to the root on the next command). Eval supplies a bubblewrap Environment.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

from lagoon.agent.redaction import Redactor, is_secret_name
from lagoon.protocols import CommandResult

__all__ = ["LocalEnvironment", "cut_output", "MAX_READ_BYTES"]

MAX_READ_BYTES = 32 * 1024 * 1024
"""Output a command may print before it is stopped: far past what is kept, well short of harm."""

_UTF8_MAX = 4  # bytes per character at most, so this many bytes per kept character always suffice
_CHUNK = 65536

# variables bash rewrites on its own; carrying them would only add noise to the diff
_SHELL_OWNED = {"PWD", "OLDPWD", "SHLVL", "_", "BASH_EXECUTION_STRING"}


def cut_output(text: str, limit: int, *, dropped: int = 0) -> tuple[str, bool]:
    """`text` if it fits in `limit` characters, else its head and tail with the cut marked, all
    within `limit`. `dropped` counts bytes already left out between head and tail (never read into
    `text`); the marker then reports them too."""
    if len(text) <= limit and not dropped:
        return text, False

    def marker(cut: int) -> str:
        more = f" and {dropped} more bytes" if dropped else ""
        return f"\n[... {cut} characters cut{more}; showing head and tail ...]\n"

    room = max(limit - len(marker(len(text))), 0)  # len(text) bounds the cut, so its digits too
    head = room // 2
    tail = room - head
    return f"{text[:head]}{marker(len(text) - head - tail)}{text[len(text) - tail:]}", True


class _HeadTail:
    """Keeps the first `keep` and the last `keep` bytes of a stream; counts what fell between."""

    def __init__(self, keep: int) -> None:
        self.keep = keep
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        room = self.keep - len(self.head)
        if room > 0:
            self.head += chunk[:room]
            chunk = chunk[room:]
        self.tail += chunk
        if len(self.tail) > self.keep:
            del self.tail[: len(self.tail) - self.keep]

    @property
    def dropped(self) -> int:
        return self.total - len(self.head) - len(self.tail)

    def text(self) -> tuple[str, str]:
        """Head and tail decoded; a character split at a gap becomes U+FFFD. With no gap the
        whole stream is decoded as one (tail empty)."""
        if not self.dropped:
            return (self.head + self.tail).decode("utf-8", "replace"), ""
        return self.head.decode("utf-8", "replace"), self.tail.decode("utf-8", "replace")


class LocalEnvironment:
    """Commands in `root`, with cwd and exported variables carried from one command to the next."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        timeout_s: float = 60.0,
        max_output_chars: int = 10000,
        max_read_bytes: int = MAX_READ_BYTES,
        redactor: Redactor | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self.max_read_bytes = max_read_bytes
        self.redactor = redactor or Redactor()
        self._base_env = self.redactor.env_without_secrets()
        self._base_env["PAGER"] = "cat"
        self._base_env["GIT_PAGER"] = "cat"
        self.cwd = self.root
        self.env_changes: dict[str, str] = {}
        self.env_unset: list[str] = []
        self._state_dir = Path(tempfile.mkdtemp(prefix="lagoon-env-"))
        # a caller that never calls close() (or an interpreter that exits) still removes the folder
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._state_dir, ignore_errors=True)

    # -- state carried between commands ------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """JSON-able cwd (relative to root) and environment changes; secrets never included."""
        return {
            "cwd": self.cwd.relative_to(self.root).as_posix() or ".",
            "env": dict(self.env_changes),
            "unset": list(self.env_unset),
        }

    def restore(self, state: dict[str, Any]) -> None:
        cwd = (self.root / state.get("cwd", ".")).resolve()
        self.cwd = cwd if cwd.is_dir() and (cwd == self.root or self.root in cwd.parents) else self.root
        self.env_changes = {k: str(v) for k, v in dict(state.get("env", {})).items() if not is_secret_name(k)}
        self.env_unset = [str(k) for k in state.get("unset", [])]

    def _env(self) -> dict[str, str]:
        env = dict(self._base_env)
        for name in self.env_unset:
            env.pop(name, None)
        env.update(self.env_changes)
        return env

    # -- running ------------------------------------------------------------------------------
    def execute(self, command: str, *, timeout_s: float | None = None) -> CommandResult:
        timeout = self.timeout_s if timeout_s is None else timeout_s
        cwd_file = self._state_dir / "cwd"
        env_file = self._state_dir / "env"
        for f in (cwd_file, env_file):
            f.unlink(missing_ok=True)
        trap = f"trap 'pwd > {_q(cwd_file)}; env -0 > {_q(env_file)}' EXIT\n"
        start = time.perf_counter()
        if not self.cwd.is_dir():
            self.cwd = self.root
        proc = subprocess.Popen(
            ["bash", "-c", trap + command],
            cwd=self.cwd,
            env=self._env(),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        buffer = _HeadTail(_UTF8_MAX * self.max_output_chars)
        deadline = time.monotonic() + timeout
        stop = "interrupted"
        try:
            stop = _drain(proc, buffer, deadline, self.max_read_bytes)
            if not stop:  # EOF: the shell may still run with its output closed
                try:
                    proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
                except subprocess.TimeoutExpired:
                    stop = "timeout"
        finally:
            if stop:
                _kill_group(proc.pid)
            proc.stdout.close()  # type: ignore[union-attr]
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # unkillable (D state): do not hang the agent on it
            pass
        duration = time.perf_counter() - start
        head, tail = (self.redactor.scrub(t) for t in buffer.text())
        if stop == "timeout":
            tail += f"\n[command timed out after {timeout:g} s; its process group was killed]"
        elif stop == "bytes":
            tail += (f"\n[command stopped after printing more than {self.max_read_bytes} bytes; "
                     "its process group was killed]")
        else:
            self._absorb_state(cwd_file, env_file)
        for f in (cwd_file, env_file):  # the env file holds the whole environment: keep it no longer
            f.unlink(missing_ok=True)
        text, truncated = cut_output(head + tail, self.max_output_chars, dropped=buffer.dropped)
        if stop == "timeout":
            exit_code = -9
        else:
            exit_code = proc.returncode if proc.returncode is not None else -9
        return CommandResult(command, exit_code, text, duration, stop == "timeout", truncated or stop == "bytes")

    def _absorb_state(self, cwd_file: Path, env_file: Path) -> None:
        try:
            cwd = Path(cwd_file.read_text().strip())
            entries = env_file.read_bytes().split(b"\0")
        except OSError:  # the command killed its own shell before the trap ran
            return
        cwd = cwd.resolve()
        self.cwd = cwd if cwd.is_dir() and (cwd == self.root or self.root in cwd.parents) else self.root
        after: dict[str, str] = {}
        for entry in entries:
            name, sep, value = entry.decode("utf-8", errors="replace").partition("=")
            if sep and name not in _SHELL_OWNED:
                after[name] = value
        base = self._base_env
        self.env_changes = {
            k: v for k, v in after.items() if base.get(k) != v and not is_secret_name(k)
        }
        self.env_unset = sorted(k for k in base if k not in after and k not in _SHELL_OWNED)

    def close(self) -> None:
        """Remove the private state folder; safe to call twice."""
        self._cleanup()

    def __enter__(self) -> LocalEnvironment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _q(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


def _drain(proc: subprocess.Popen[bytes], buffer: _HeadTail, deadline: float, max_bytes: int) -> str:
    """Read `proc`'s output into `buffer` until EOF (""), the deadline ("timeout") or past
    `max_bytes` ("bytes"). EOF, not exit, ends it: a background child holding the pipe is waited for
    up to the deadline, as `communicate()` would."""
    fd = proc.stdout.fileno()  # type: ignore[union-attr]
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return "timeout"
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, _CHUNK)
        if not chunk:
            return ""
        buffer.add(chunk)
        if buffer.total > max_bytes:
            return "bytes"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
