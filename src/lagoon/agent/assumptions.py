"""`AssumptionBook`: the run's assumptions — named claims with executable checks — kept checked.

Code derives some from what the gate retrieved and what the run observed (`derive`):

    kind        claim                                       check (holds when)
    file_hash   "<path> is as it was read"                  the file's content hash equals the captured one
    symbol      "<name> is defined at <path>:<line>"        the chunk's first lines still name the symbol
    test_fails  "<test id> fails"                           `python -m pytest -q <id>` exits non-zero
    git_head    "the working tree is on commit <sha>"       `git rev-parse HEAD` prints <sha>
    dependency  "<dist> is installed at <version>"          `importlib.metadata.version(dist)` says so
                (for the third-party imports of the retrieved chunks, as the workspace's python sees them)

and the model declares its own through the `assume` tool (`declare`):

    shell       "<claim>"                                   the command exits 0 (in a subshell at the root)
    python      "<claim>"                                   `python -c CODE` exits 0

`refresh()` runs before every model call and re-runs only checks that could have changed: each
check remembers the stat signature (mtime, ctime, size, inode) of the files it watches at its last
run and is skipped while they all match — a file written within `RACY_S` of its check is re-checked
anyway, since its stat may not show the next write (git's racy-index rule). A check watching no
files re-runs after any tool call that may have changed the workspace (`touch()`). A result that
differs from the last one comes back as a `Drift`.

`select(cap)` is what a snapshot declares: every model assumption, then derived ones by priority
(failing tests, commit, files by retrieval rank, dependencies, symbols) up to
`context.max_assumptions_per_snapshot`; `derive(..., room=)` keeps only the derived ones that fit, so
no check runs for a claim the snapshot does not make.

Shell and Python checks run through the agent's `Environment` (the same sandbox as its commands)
in a subshell, so a check's `cd` or `export` never leaks into the agent's shell state. This module
is *not* a sandbox of its own and does not decide what a failed check means (`ContextGate` does).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from lagoon.context.evidence import Evidence
from lagoon.context.snapshot import Assumption
from lagoon.protocols import ChunkLike, Environment

__all__ = ["AssumptionBook", "Drift", "RACY_S", "MODEL_KINDS"]

RACY_S = 2.0
MODEL_KINDS = ("shell", "python")
_DETAIL_CHARS = 400
_PRIORITY = {"test_fails": 0, "git_head": 1, "file_hash": 2, "dependency": 3, "symbol": 4}
_IMPORT = re.compile(r"^\s*(?:from\s+([A-Za-z_]\w*)[\w.]*\s+import|import\s+([A-Za-z_]\w*))", re.M)
_VERSIONS = (  # run by the workspace's python: import name → [distribution, version, metadata path]
    "import importlib.metadata as m, json, sys\n"
    "names = sys.argv[1:]; dists = m.packages_distributions(); out = {}\n"
    "for n in names:\n"
    "    for d in dists.get(n, [])[:1]:\n"
    "        try:\n"
    "            dist = m.distribution(d); out[n] = [d, dist.version, str(getattr(dist, '_path', ''))]\n"
    "        except Exception:\n"
    "            pass\n"
    "print(json.dumps(out))\n")
_Sig = tuple[int, int, int, int] | None


@dataclass(frozen=True)
class Drift:
    """An assumption whose check result changed (`was` None: it had never been checked)."""

    assumption: Assumption
    was: bool | None

    @property
    def name(self) -> str:
        return self.assumption.name

    def to_event(self) -> dict[str, object]:
        a = self.assumption
        return {"name": a.name, "claim": a.claim, "check": a.check, "kind": a.kind, "source": a.source,
                "was": self.was, "holds": a.holds, "at": a.checked_at, "detail": a.detail}


def _sig(path: Path) -> _Sig:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino


class AssumptionBook:
    """The assumptions of one run; see the module docstring."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        environment: Environment | None = None,
        file_hash: Callable[[str], str | None] | None = None,
        timeout_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.root = Path(root).resolve()
        self.environment = environment
        self.file_hash = file_hash
        self.timeout_s = timeout_s
        self.clock = clock
        self.derived: dict[str, Assumption] = {}
        self.declared: dict[str, Assumption] = {}
        self._seen: dict[str, dict[str, _Sig]] = {}  # name → watched path → stat at the last check
        self._dirty: set[str] = set()  # no-watch checks to re-run (the workspace may have changed)
        self.checks_run = 0
        self._deps: dict[str, tuple[str, str, str] | None] = {}  # import name → (dist, version, metadata path)

    # -- the set --------------------------------------------------------------------------------
    def all(self) -> list[Assumption]:
        return [*self.declared.values(), *self.derived.values()]

    def get(self, name: str) -> Assumption:
        found = self.declared.get(name) or self.derived.get(name)
        if found is None:
            known = ", ".join(a.name for a in self.all()) or "none"
            raise KeyError(f"no assumption {name!r}; the assumptions are: {known}")
        return found

    def select(self, cap: int) -> list[Assumption]:
        """What a snapshot declares: model assumptions, then derived ones by priority, `cap` at most."""
        derived = sorted(self.derived.values(), key=lambda a: _PRIORITY.get(a.kind, 9))
        return [*self.declared.values(), *derived][: max(cap, len(self.declared))]

    # -- deriving -------------------------------------------------------------------------------
    def derive(self, chunks: Sequence[ChunkLike], evidence: Evidence | None = None, *,
               room: int | None = None) -> None:
        """Replace the derived assumptions with those of `chunks` and `evidence`, as of now; only the
        `room` most telling are kept (None: all)."""
        now = self.clock()
        out: dict[str, Assumption] = {}
        for test in (evidence.failing if evidence else ()):
            watch = (test.split("::")[0], *dict.fromkeys(c.path for c in chunks),
                     *(evidence.edited if evidence else ()))
            out[f"fails:{test}"] = Assumption(
                name=f"fails:{test}", claim=f"{test} fails", check=f"! python -m pytest -q -x {shlex.quote(test)}",
                kind="test_fails", source="derived", holds=True, checked_at=now,
                watch=tuple(dict.fromkeys(watch)), detail="reported failing by the agent's last test run")
        head = self._git_head()
        if head is not None:
            commit, watch = head
            out["git:HEAD"] = Assumption(
                name="git:HEAD", claim=f"the working tree is on commit {commit[:12]}",
                check=f'test "$(git rev-parse HEAD)" = {commit}', kind="git_head", source="derived",
                holds=True, checked_at=now, watch=watch)
        if self.file_hash is not None:
            for path in dict.fromkeys(c.path for c in chunks):
                digest = self.file_hash(path)
                out[f"file:{path}"] = Assumption(
                    name=f"file:{path}", claim=f"{path} is as it was read",
                    check=f"content_hash({path}) == {digest}", kind="file_hash", source="derived",
                    holds=digest is not None, checked_at=now, watch=(path,))
        if room is None or len(out) < room:
            out.update(self._dependencies(chunks, now))
        for c in chunks:
            if c.symbol:
                name = f"symbol:{c.path}:{c.symbol}"
                out[name] = Assumption(
                    name=name, claim=f"{c.symbol} is defined at {c.path}:{c.start_line}",
                    check=f"symbol_at({c.path}, {c.start_line}, {c.symbol})", kind="symbol", source="derived",
                    holds=self._symbol_at(c.path, c.start_line, c.symbol), checked_at=now, watch=(c.path,))
        ranked = sorted(out.values(), key=lambda a: _PRIORITY.get(a.kind, 9))
        self.derived = {a.name: a for a in (ranked if room is None else ranked[:max(room, 0)])}
        out = self.derived
        for name in list(self._seen):
            if name not in self.declared:
                del self._seen[name]
        for a in out.values():
            self._remember(a)

    def _git_head(self) -> tuple[str, tuple[str, ...]] | None:
        git = self.root / ".git"
        head_file = git / "HEAD"
        if not head_file.is_file():
            return None
        head = head_file.read_text(encoding="utf-8", errors="replace").strip()
        watch = [".git/HEAD"]
        if head.startswith("ref: "):
            ref = head[5:].strip()
            ref_file = git / ref
            if ref_file.is_file():
                commit = ref_file.read_text(encoding="utf-8").strip()
                watch.append(f".git/{ref}")
            else:  # packed
                packed = (git / "packed-refs")
                lines = packed.read_text(encoding="utf-8").splitlines() if packed.is_file() else []
                found = [ln.split()[0] for ln in lines if ln.endswith(" " + ref)]
                if not found:
                    return None  # an unborn branch: no commit to be on
                commit = found[0]
                watch.append(".git/packed-refs")
        else:
            commit = head
        if not re.fullmatch(r"[0-9a-f]{40}|[0-9a-f]{64}", commit):
            return None
        return commit, tuple(watch)

    def _dependencies(self, chunks: Sequence[ChunkLike], now: float) -> dict[str, Assumption]:
        """Installed versions of the third-party packages the chunks import (one command)."""
        names = sorted({m.group(1) or m.group(2) for c in chunks for m in _IMPORT.finditer(c.text)}
                       - set(sys.stdlib_module_names))
        names = [n for n in names if not ((self.root / n).exists() or (self.root / f"{n}.py").exists()
                                          or (self.root / "src" / n).exists())]  # the repo's own modules
        if not names or self.environment is None:
            return {}
        names = names[:20]
        # one python per snapshot is the cost; a module looked up before whose metadata is unchanged is not asked again
        ask = [n for n in names if n not in self._deps or (self._deps[n] and _sig(Path(self._deps[n][2])) is None)]
        if ask:
            args = " ".join(shlex.quote(n) for n in ask)
            root = shlex.quote(str(self.root))
            result = self.environment.execute(f"( cd {root} && python -c {shlex.quote(_VERSIONS)} {args} )",
                                              timeout_s=self.timeout_s)
            try:
                found = json.loads(result.output.strip().splitlines()[-1]) if result.exit_code == 0 else {}
            except (ValueError, IndexError):
                found = {}
            for n in ask:
                self._deps[n] = tuple(found[n]) if n in found else None
        out = {}
        for module, (dist, version, meta) in sorted((n, self._deps[n]) for n in names if self._deps.get(n)):
            code = f"import importlib.metadata as m; assert m.version({dist!r}) == {version!r}"
            out[f"dependency:{dist}"] = Assumption(
                name=f"dependency:{dist}", claim=f"{dist} is installed at {version} (imported as {module})",
                check=code, kind="dependency", source="derived", holds=True, checked_at=now,
                watch=(meta,) if meta else ())
        return out

    def _symbol_at(self, path: str, line: int, symbol: str) -> bool:
        try:
            lines = (self.root / path).read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return False
        leaf = re.split(r"[.:#]", symbol)[-1]
        window = lines[max(line - 1, 0): line + 4]  # decorators and headers push the name down a little
        return any(re.search(rf"\b{re.escape(leaf)}\b", ln) for ln in window)

    # -- declaring ------------------------------------------------------------------------------
    def declare(self, name: str, claim: str, check: str, kind: str = "shell",
                watch: Iterable[str] = ()) -> Assumption:
        """Add (or replace) a model assumption and check it now."""
        if kind not in MODEL_KINDS:
            raise ValueError(f"assumption kind {kind!r}: use one of {', '.join(MODEL_KINDS)}")
        a = Assumption(name=name, claim=claim, check=check, kind=kind, source="model",
                       watch=tuple(str(w) for w in watch))
        self.declared[name] = a
        return self._run(a)

    def retract(self, name: str) -> None:
        """Forget a model assumption (one refused at declaration)."""
        self.declared.pop(name, None)
        self._seen.pop(name, None)
        self._dirty.discard(name)

    # -- checking -------------------------------------------------------------------------------
    def touch(self) -> None:
        """The workspace may have changed (a command or an edit ran): no-watch checks are due."""
        self._dirty.update(a.name for a in self.all() if not a.watch)

    def due(self, a: Assumption) -> bool:
        if a.holds is None or a.checked_at is None:
            return True
        if not a.watch:
            return a.name in self._dirty
        seen = self._seen.get(a.name, {})
        for rel in a.watch:
            sig = _sig(self.root / rel)
            if sig != seen.get(rel):
                return True
            if sig is not None and max(sig[0], sig[1]) > (a.checked_at - RACY_S) * 1e9:
                return True  # written too close to the check: its stat may not show a later write
        return False

    def refresh(self) -> list[Drift]:
        """Re-run every check that could have changed; the ones whose result changed."""
        drift = []
        for a in self.all():
            if self.due(a):
                was = a.holds
                now = self._run(a)
                if now.holds != was:
                    drift.append(Drift(now, was))
        return drift

    def verify(self, name: str) -> Drift:
        """Re-run one check now, due or not."""
        a = self.get(name)
        return Drift(self._run(a), a.holds)

    def reverify_declared(self) -> list[Drift]:
        """Re-run every model assumption (a new snapshot re-verifies what it declares)."""
        out = []
        for a in list(self.declared.values()):
            now = self._run(a)
            if now.holds != a.holds:
                out.append(Drift(now, a.holds))
        return out

    def _run(self, a: Assumption) -> Assumption:
        self.checks_run += 1
        holds, detail = self._evaluate(a)
        new = replace(a, holds=holds, checked_at=self.clock(), detail=detail[-_DETAIL_CHARS:])
        (self.declared if a.source == "model" else self.derived)[a.name] = new
        self._dirty.discard(a.name)
        self._remember(new)
        return new

    def _remember(self, a: Assumption) -> None:
        self._seen[a.name] = {rel: _sig(self.root / rel) for rel in a.watch}

    def _evaluate(self, a: Assumption) -> tuple[bool, str]:
        if a.kind == "file_hash":
            path = a.watch[0]
            now = self.file_hash(path) if self.file_hash is not None else None
            expected = a.check.rsplit("== ", 1)[-1]
            return now is not None and now == expected, "unchanged" if now == expected else (
                "deleted" if now is None else f"content hash is now {now}")
        if a.kind == "symbol":
            m = re.fullmatch(r"symbol_at\((.+), (\d+), (.+)\)", a.check)
            assert m is not None, a.check  # built by derive()
            ok = self._symbol_at(m.group(1), int(m.group(2)), m.group(3))
            return ok, "found" if ok else f"{m.group(3)} is no longer at {m.group(1)}:{m.group(2)}"
        if self.environment is None:
            return False, "no environment to run the check in"
        command = a.check if a.kind not in ("python", "dependency") else f"python -c {shlex.quote(a.check)}"
        root = shlex.quote(str(self.root))
        result = self.environment.execute(f"( cd {root} && {command} )", timeout_s=self.timeout_s)
        tail = result.output.strip()
        return result.exit_code == 0, f"exit {result.exit_code}" + (f": {tail}" if tail else "")
