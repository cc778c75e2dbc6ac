"""`LocalEnvironment`: runs the agent's shell commands in the workspace, one subprocess each.

Each command is its own `bash -c` process (a long-lived shell proved flaky elsewhere), started in
its own process group with stdin closed and stdout+stderr merged. State a shell would keep is
carried across commands instead: an EXIT trap writes the final `pwd` and `env -0` to a private
temp folder, and the next command starts in that folder with that environment. `state()` /
`restore()` move that state in and out of the session store (`inference.tool_state_persistence`).

A timeout kills the whole process group. Output longer than `max_output_chars` is kept as head and
tail with the cut marked. Secret-looking variables are removed from the environment commands see.

This is *not* a sandbox: commands run with the user's rights and may `cd` anywhere (a cwd outside
the workspace is reset to the root on the next command). Eval supplies a bubblewrap Environment.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from lagoon.agent.redaction import Redactor, is_secret_name
from lagoon.protocols import CommandResult

__all__ = ["LocalEnvironment", "cut_output"]

# variables bash rewrites on its own; carrying them would only add noise to the diff
_SHELL_OWNED = {"PWD", "OLDPWD", "SHLVL", "_", "BASH_EXECUTION_STRING"}


def cut_output(text: str, limit: int) -> tuple[str, bool]:
    """`text` if it fits in `limit` characters, else its head and tail with the cut marked."""
    if len(text) <= limit:
        return text, False
    head = limit // 2
    tail = limit - head
    cut = len(text) - head - tail
    return f"{text[:head]}\n[... {cut} characters cut; showing head and tail ...]\n{text[-tail:]}", True


class LocalEnvironment:
    """Commands in `root`, with cwd and exported variables carried from one command to the next."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        timeout_s: float = 60.0,
        max_output_chars: int = 10000,
        redactor: Redactor | None = None,
    ) -> None:
        self.root = Path(root).resolve()
        self.timeout_s = timeout_s
        self.max_output_chars = max_output_chars
        self.redactor = redactor or Redactor()
        self._base_env = self.redactor.env_without_secrets()
        self._base_env["PAGER"] = "cat"
        self._base_env["GIT_PAGER"] = "cat"
        self.cwd = self.root
        self.env_changes: dict[str, str] = {}
        self.env_unset: list[str] = []
        self._state_dir = Path(tempfile.mkdtemp(prefix="lagoon-env-"))

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
        timed_out = False
        try:
            raw, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc.pid)
            try:
                raw, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:  # a grandchild left the group and kept the pipe
                proc.kill()
                raw = b""
        duration = time.perf_counter() - start
        text = raw.decode("utf-8", errors="replace")
        if timed_out:
            text += f"\n[command timed out after {timeout:g} s; its process group was killed]"
        else:
            self._absorb_state(cwd_file, env_file)
        text = self.redactor.scrub(text)
        text, truncated = cut_output(text, self.max_output_chars)
        exit_code = -9 if timed_out else proc.returncode
        return CommandResult(command, exit_code, text, duration, timed_out, truncated)

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
        for f in self._state_dir.iterdir():
            f.unlink(missing_ok=True)
        self._state_dir.rmdir()


def _q(path: Path) -> str:
    return "'" + str(path).replace("'", "'\\''") + "'"


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
