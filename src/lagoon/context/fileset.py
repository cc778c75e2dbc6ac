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
from dataclasses import dataclass
from pathlib import Path

import pathspec

from lagoon.config import ContextSection
from lagoon.errors import WorkspaceError

__all__ = ["FileSet", "FileStat", "read_text"]

_ALWAYS_EXCLUDED = (".lagoon/", ".git/")
_SNIFF_BYTES = 8192


@dataclass(frozen=True)
class FileStat:
    size: int
    mtime_ns: int


class FileSet:
    def __init__(self, repo: Path, config: ContextSection) -> None:
        self.repo = Path(repo).resolve()
        if not self.repo.is_dir():
            raise WorkspaceError(f"{repo}: not a directory; pass the root of the repository to index")
        self.config = config
        self._exclude = pathspec.GitIgnoreSpec.from_lines([*_ALWAYS_EXCLUDED, *config.exclude])

    @staticmethod
    def _ignore_spec(directory: Path) -> pathspec.GitIgnoreSpec | None:
        try:
            lines = (directory / ".gitignore").read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError:
            return None
        return pathspec.GitIgnoreSpec.from_lines(lines) if lines else None

    def scan(self) -> dict[str, FileStat]:
        """Repo-relative path → size and mtime of every candidate file, in walk order."""
        found: dict[str, FileStat] = {}
        # Each stack entry: a directory relative to the repo ('' or ending in '/') and the
        # .gitignore specs in force there, as (base directory, spec) pairs.
        Active = tuple[tuple[str, pathspec.GitIgnoreSpec], ...]
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
                if self._exclude.match_file(probe) or _ignored(active, probe):
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


def _ignored(active: list[tuple[str, pathspec.GitIgnoreSpec]], rel: str) -> bool:
    for base, spec in active:
        if rel.startswith(base) and spec.match_file(rel[len(base) :]):
            return True
    return False
