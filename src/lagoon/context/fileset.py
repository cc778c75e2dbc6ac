"""Which files of a repository are indexed.

`FileSet(repo, config).scan()` walks the repository and returns the indexable files with their size
and modification time: everything except what a `.gitignore` (the root one and nested ones, with
git's semantics via `pathspec`) or `context.exclude` matches, the `.lagoon/` state folder, files
larger than `context.max_file_bytes`, symlinks, and binaries (a NUL byte in the first 8 KiB, found
when the file is read). Paths are repo-relative with '/' separators.

This is *not* git: untracked files that no ignore rule matches are indexed too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pathspec

from lagoon.config import DEFAULT_STATE_DIR, ContextSection
from lagoon.errors import WorkspaceError

__all__ = ["FileSet", "FileStat", "ignore_matcher", "read_text"]

_ALWAYS_EXCLUDED = (".lagoon/", ".git/")
_SNIFF_BYTES = 8192


Matcher = Callable[[str], bool]
"""True when a normalised repo-relative path (directories end in '/') is ignored."""


def ignore_matcher(lines: list[str]) -> Matcher | None:
    """A gitignore matcher for `lines` (git's semantics, via `pathspec`), or None when they hold no
    pattern. Without negations ("!pattern") a path is ignored when any pattern matches, so the
    patterns are joined into one regular expression: one `match` per path instead of one per
    pattern (the scan is the floor of every index update; this makes it ~2× faster). With
    negations the order matters and pathspec decides."""
    spec = pathspec.GitIgnoreSpec.from_lines(lines)
    patterns = [p for p in spec.patterns if p.include is not None]
    if not patterns:
        return None
    if all(p.include and p.regex is not None for p in patterns):
        # pathspec names a group in every pattern; the names would clash once joined
        joined = "|".join(f"(?:{re.sub(r'[(][?]P<[^>]+>', '(?:', p.regex.pattern)})" for p in patterns)
        return re.compile(joined).match  # type: ignore[return-value]
    return spec.match_file


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int


class FileSet:
    def __init__(self, repo: Path, config: ContextSection, *, state_dir: str = DEFAULT_STATE_DIR) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise WorkspaceError(f"{repo}: not a directory; pass the root of the repository to index")
        self.config = config
        # the state folder holds trajectories and sessions: never code, whatever agent.state_dir says
        self._exclude = ignore_matcher([*_ALWAYS_EXCLUDED, f"/{state_dir.rstrip('/')}/", *config.exclude])
        assert self._exclude is not None

    @staticmethod
    def _ignore_spec(directory: Path) -> Matcher | None:
        try:
            lines = (directory / ".gitignore").read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return None
        return ignore_matcher(lines)

    def scan(self) -> dict[str, FileStat]:
        """Repo-relative path → size and mtime of every candidate file, in walk order."""
        found: dict[str, FileStat] = {}
        # Each stack entry: a directory relative to the repo ('' or ending in '/') and the
        # .gitignore specs in force there, as (base directory, spec) pairs.
        Active = tuple[tuple[str, Matcher], ...]
        stack: list[tuple[str, Active]] = [("", ())]
        while stack:
            rel_dir, active = stack.pop()
            here = self.repo / rel_dir
            spec = self._ignore_spec(here)
            if spec is not None:
                active = (*active, (rel_dir, spec))
            try:
                entries = sorted(os.scandir(here), key=lambda e: e.name)
            except OSError:
                continue
            subdirs = []
            for entry in entries:
                rel = f"{rel_dir}{entry.name}"
                if entry.is_symlink():
                    continue
                is_dir = entry.is_dir()
                probe = rel + "/" if is_dir else rel
                if self._exclude(probe) or _ignored(active, probe):
                    continue
                if is_dir:
                    subdirs.append(rel + "/")
                    continue
                st = entry.stat()
                if st.st_size <= self.config.max_file_bytes:
                    found[rel] = FileStat(st.st_size, st.st_mtime_ns)
            stack.extend((d, active) for d in reversed(subdirs))
        return found

    def read(self, rel: str) -> str | None:
        """The file's text (UTF-8, undecodable bytes replaced), or None for a binary file."""
        return read_text(self.repo / rel)


def read_text(path: Path) -> str | None:
    """A file's text (UTF-8, undecodable bytes replaced), or None for a binary or unreadable file."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data[:_SNIFF_BYTES]:
        return None
    return data.decode("utf-8", errors="replace")


def _ignored(active: tuple[tuple[str, Matcher], ...], rel: str) -> bool:
    for base, match in active:
        if rel.startswith(base) and match(rel[len(base) :]):
            return True
    return False
