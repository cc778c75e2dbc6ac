"""A Docker-free sandbox for task environments: bubblewrap, or a plain temporary folder.

`Sandbox` implements `lagoon.protocols.Environment`, so the agent's commands and the task's tests
run in the same place. With bubblewrap (`bwrap`) the workspace is bound at the task's WORKDIR
(``/app``), extra mounts (tests read-only at ``/tests``, ``/logs/verifier`` writable, the reference
solution read-only) are added per call, the network is cut (``--unshare-net``), the rest of the
host is bound read-only, and the Python running Lagoon (which has pytest) is first on ``PATH``.
Without bubblewrap the command runs in the workspace folder with ``TEST_DIR`` pointing at the host
tests folder; tasks that hard-code ``/app`` or ``/logs`` paths cannot pass there, which the result
records as ``sandbox: none``.

`parse_dockerfile` and `build_environment` turn a task's Dockerfile into that workspace: FROM is
noted, WORKDIR / ENV / ARG are honoured, COPY / ADD of files from the build context are copied, RUN
lines run inside the sandbox unless they need the network. Anything else raises
`EnvironmentUnsupported` ("environment unsupported"), which the runner reports apart from the
agent's failures.

This is *not* a security boundary against a hostile agent (it runs as the same user, and the host
is readable); it keeps honest tasks from touching the network or the host's files.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path, PurePosixPath

from lagoon.errors import TaskSpecError
from lagoon.protocols import CommandResult

__all__ = [
    "Sandbox",
    "EnvironmentUnsupported",
    "EnvSpec",
    "parse_dockerfile",
    "build_environment",
    "bwrap_available",
    "SANDBOX_MODES",
]

SANDBOX_MODES = ("auto", "bwrap", "none")
_STATE_MOUNT = "/run/lagoon-state"
_HOST_SKIP = {"proc", "dev", "sys", "tmp", "run", "app", "tests", "logs", "solution"}
_NETWORK = [
    re.compile(p)
    for p in (
        r"\b(apt-get|apt|apk|yum|dnf|conda|gem|brew)\b",
        r"\bpip3?\s+install\b",
        r"\buv\s+(pip|add|sync|tool|run)\b",
        r"\b(npm|pnpm|yarn)\s+(i|install|add|ci)\b",
        r"\b(curl|wget)\b",
        r"\bgit\s+(clone|fetch|pull)\b",
        r"\bcargo\s+(install|fetch|add)\b",
        r"\bgo\s+(get|install|mod\s+download)\b",
    )
]


class EnvironmentUnsupported(TaskSpecError):
    """The task's environment needs what this sandbox cannot give (network, a prebuilt image, an
    unknown Dockerfile instruction); reported as "environment unsupported", not an agent failure."""


def bwrap_available() -> bool:
    return shutil.which("bwrap") is not None


@dataclass(frozen=True)
class Step:
    kind: str  # "copy" | "run"
    args: tuple[str, ...]
    workdir: str
    line: int


@dataclass(frozen=True)
class EnvSpec:
    """What a Dockerfile asks for, in the sandbox's terms."""

    base_image: str | None = None
    workdir: str = "/app"
    env: Mapping[str, str] = field(default_factory=dict)
    steps: tuple[Step, ...] = ()


def _logical_lines(text: str) -> list[tuple[int, str]]:
    out, buf, start = [], "", 0
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if not buf:
            start = n
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        out.append((start, buf + line))
        buf = ""
    if buf:
        out.append((start, buf))
    return out


def _words(rest: str) -> list[str]:
    rest = rest.strip()
    if rest.startswith("["):
        import json

        try:
            return [str(w) for w in json.loads(rest)]
        except ValueError:
            pass
    return shlex.split(rest)


def parse_dockerfile(path: Path) -> EnvSpec:
    """Read a Dockerfile into an EnvSpec, or raise EnvironmentUnsupported naming the line."""
    env: dict[str, str] = {}
    args: dict[str, str] = {}
    steps: list[Step] = []
    workdir: str | None = None
    root: str | None = None
    base = None
    for n, line in _logical_lines(path.read_text(encoding="utf-8")):
        op, _, rest = line.partition(" ")
        op = op.upper()
        where = f"{path}:{n}"
        rest = re.sub(r"\$\{?(\w+)\}?", lambda m: {**args, **env}.get(m.group(1), m.group(0)), rest)
        if op == "FROM":
            base = rest.split()[0] if rest.split() else None
        elif op == "WORKDIR":
            target = PurePosixPath(workdir or "/") / rest.strip()
            if root is None:
                root = str(target)
            elif not (target == PurePosixPath(root) or PurePosixPath(root) in target.parents):
                raise EnvironmentUnsupported(f"{where}: WORKDIR {target} leaves the workspace {root}")
            workdir = str(target)
        elif op == "ENV":
            words = shlex.split(rest)
            if len(words) >= 2 and "=" not in words[0]:
                env[words[0]] = " ".join(words[1:])
            else:
                for w in words:
                    k, _, v = w.partition("=")
                    env[k] = v
        elif op == "ARG":
            k, _, v = rest.strip().partition("=")
            args[k] = v
        elif op in {"COPY", "ADD"}:
            words = [w for w in _words(rest) if not w.startswith("--chown") and not w.startswith("--chmod")]
            if any(w.startswith("--") for w in words) or len(words) < 2:
                raise EnvironmentUnsupported(f"{where}: {op} {rest!r} (flags such as --from need Docker)")
            if any(re.match(r"^[a-z]+://", w) for w in words):
                raise EnvironmentUnsupported(f"{where}: {op} from a URL needs the network")
            steps.append(Step("copy", tuple(words), workdir or "/app", n))
        elif op == "RUN":
            command = " ".join(_words(rest)) if rest.strip().startswith("[") else rest
            for pattern in _NETWORK:
                if pattern.search(command):
                    raise EnvironmentUnsupported(f"{where}: RUN {command!r} needs the network")
            steps.append(Step("run", (command,), workdir or "/app", n))
        elif op in {"CMD", "ENTRYPOINT", "LABEL", "EXPOSE", "USER", "MAINTAINER", "STOPSIGNAL", "HEALTHCHECK"}:
            continue
        else:
            raise EnvironmentUnsupported(f"{where}: instruction {op} is not supported without Docker")
    return EnvSpec(base_image=base, workdir=root or "/app", env=env, steps=tuple(steps))


@dataclass(frozen=True)
class Sandbox:
    """Runs commands for one task. `root` is the workspace on the host; `workdir` is where it
    appears inside the sandbox. `mounts` maps sandbox paths to (host path, writable)."""

    root: Path
    mode: str = "auto"
    workdir: str = "/app"
    env: Mapping[str, str] = field(default_factory=dict)
    mounts: Mapping[str, tuple[Path, bool]] = field(default_factory=dict)
    timeout_s: float = 180.0
    output_limit: int = 1_000_000
    output_cap: int = 32 * 1024 * 1024
    """Bytes a command may print before its process group is killed: output goes to a temporary
    file, and `yes` or `cat /dev/urandom` would otherwise fill the disk until the timeout."""
    state_dir: Path | None = None
    """When set, the working directory and exported variables carry from one command to the next
    (the agent's shell semantics); the shell's final state is kept in this host folder."""

    def __post_init__(self) -> None:
        if self.mode not in SANDBOX_MODES:
            raise TaskSpecError(f"sandbox mode {self.mode!r} is unknown; use one of {', '.join(SANDBOX_MODES)}")
        if self.mode == "bwrap" and not bwrap_available():
            raise TaskSpecError("sandbox 'bwrap' asked for but bubblewrap is not installed; apt-get install bubblewrap")

    @property
    def kind(self) -> str:
        """'bwrap' or 'none', as resolved on this machine."""
        if self.mode == "auto":
            return "bwrap" if bwrap_available() else "none"
        return self.mode

    def with_mounts(self, **mounts: tuple[Path, bool]) -> Sandbox:
        """A copy with more mounts; keys are sandbox paths with '/' written as '__' (logs__verifier)."""
        extra = {"/" + k.replace("__", "/"): v for k, v in mounts.items()}
        return replace(self, mounts={**self.mounts, **extra})

    def path_of(self, inside: str) -> str:
        """A sandbox path as the command will see it (host path when there is no bwrap)."""
        if self.kind == "bwrap":
            return inside
        for dest, (host, _) in sorted(self.mounts.items(), key=lambda kv: -len(kv[0])):
            if inside == dest or inside.startswith(dest + "/"):
                return str(host) + inside[len(dest):]
        if inside == self.workdir or inside.startswith(self.workdir + "/"):
            return str(self.root) + inside[len(self.workdir):]
        return inside

    def _environ(self) -> dict[str, str]:
        pybin = str(Path(sys.executable).parent)
        path = os.pathsep.join([pybin, os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin")])
        env = {
            "PATH": path,
            "HOME": os.environ.get("HOME", "/root"),
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",
            # host pytest plugins (hypothesis, anyio ...) cost seconds per run and are not the task's
            "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
            "TEST_DIR": self.path_of("/tests"),
        }
        for key in ("RUSTUP_HOME", "CARGO_HOME", "TERM"):
            if key in os.environ:
                env[key] = os.environ[key]
        env.update(self.env)
        return env

    def _argv(self, command: str, cwd: str) -> list[str]:
        if self.kind != "bwrap":
            return ["bash", "-c", command]
        argv = ["bwrap", "--die-with-parent", "--unshare-net", "--unshare-pid", "--unshare-ipc"]
        for entry in sorted(Path("/").iterdir()):
            if entry.name in _HOST_SKIP:
                continue
            if entry.is_symlink():
                argv += ["--symlink", os.readlink(entry), str(entry)]
            elif entry.is_dir():
                argv += ["--ro-bind", str(entry), str(entry)]
        argv += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
        argv += ["--bind", str(self.root), self.workdir]
        if self.state_dir is not None:
            argv += ["--bind", str(self.state_dir), _STATE_MOUNT]
        for dest, (host, writable) in sorted(self.mounts.items()):
            argv += ["--bind" if writable else "--ro-bind", str(host), dest]
        return [*argv, "--chdir", cwd, "bash", "-c", command]

    def execute(self, command: str, *, timeout_s: float | None = None, cwd: str | None = None) -> CommandResult:
        """Run `command` with bash in the sandbox; kill its process group on timeout; cut output."""
        cwd = cwd or self.workdir
        host_cwd = self.path_of(cwd) if self.kind != "bwrap" else None
        if host_cwd is not None:
            Path(host_cwd).mkdir(parents=True, exist_ok=True)
        timeout = timeout_s or self.timeout_s
        start = time.monotonic()
        script = command
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            state = _STATE_MOUNT if self.kind == "bwrap" else str(self.state_dir)
            script = (
                f"[ -f {state}/env ] && . {state}/env 2>/dev/null; "
                f"[ -f {state}/cwd ] && cd \"$(cat {state}/cwd)\" 2>/dev/null; "
                f"trap 'pwd > {state}/cwd; export -p > {state}/env' EXIT\n{command}"
            )
        with tempfile.TemporaryFile() as out:
            proc = subprocess.Popen(
                self._argv(script, cwd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=host_cwd or str(self.root),
                env=self._environ(),
                start_new_session=True,
            )
            timed_out = capped = False
            deadline = start + timeout
            while True:  # wait in short slices, watching the output file's size
                try:
                    code = proc.wait(timeout=0.05)
                    break
                except subprocess.TimeoutExpired:
                    capped = os.fstat(out.fileno()).st_size > self.output_cap
                    timed_out = not capped and time.monotonic() > deadline
                    if capped or timed_out:
                        os.killpg(proc.pid, signal.SIGKILL)
                        code = proc.wait()
                        break
            out.seek(0)
            size = os.fstat(out.fileno()).st_size
            truncated = size > self.output_limit
            if truncated:
                half = self.output_limit // 2
                head = out.read(half)
                out.seek(size - half)
                text = (
                    head.decode("utf-8", "replace")
                    + f"\n[... {size - 2 * half} bytes cut ...]\n"
                    + out.read(half).decode("utf-8", "replace")
                )
            else:
                text = out.read().decode("utf-8", "replace")
        if timed_out:
            text += f"\n[timed out after {timeout:g} s]"
        elif capped:
            text += f"\n[stopped after printing more than {self.output_cap} bytes; its process group was killed]"
        return CommandResult(
            command=command,
            exit_code=124 if timed_out else code,
            output=text,
            duration_s=time.monotonic() - start,
            timed_out=timed_out,
            truncated=truncated or capped,
        )


def _copy(context: Path, sandbox: Sandbox, step: Step) -> None:
    *sources, dest = step.args
    inside = PurePosixPath(step.workdir) / dest if not dest.startswith("/") else PurePosixPath(dest)
    root = PurePosixPath(sandbox.workdir)
    if not (inside == root or root in inside.parents):
        raise EnvironmentUnsupported(f"Dockerfile line {step.line}: COPY to {inside} is outside the workspace {root}")
    target = sandbox.root / inside.relative_to(root)
    for pattern in sources:
        matches = sorted(context.glob(pattern)) if any(c in pattern for c in "*?[") else [context / pattern]
        for src in matches:
            src = src.resolve()
            if not src.exists() or not (src == context.resolve() or context.resolve() in src.parents):
                raise EnvironmentUnsupported(f"Dockerfile line {step.line}: COPY source {pattern!r} is not in {context}")
            if src.is_dir():
                shutil.copytree(src, target, dirs_exist_ok=True)
            else:
                dest_file = target / src.name if (dest.endswith("/") or target.is_dir() or len(sources) > 1) else target
                dest_file.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dest_file)


def build_environment(sandbox: Sandbox, dockerfile: Path | None, *, timeout_s: float = 300.0) -> Sandbox:
    """Apply a Dockerfile to the sandbox's workspace; return the sandbox with its WORKDIR and ENV."""
    if dockerfile is None:
        return sandbox
    spec = parse_dockerfile(dockerfile)
    sandbox = replace(sandbox, workdir=spec.workdir, env={**sandbox.env, **spec.env})
    for step in spec.steps:
        if step.kind == "copy":
            _copy(dockerfile.parent, sandbox, step)
            continue
        result = sandbox.execute(step.args[0], timeout_s=timeout_s, cwd=step.workdir)
        if result.exit_code != 0:
            raise EnvironmentUnsupported(
                f"{dockerfile}:{step.line}: RUN failed with exit {result.exit_code} in the sandbox: "
                f"{result.output[-400:]}"
            )
    return sandbox
