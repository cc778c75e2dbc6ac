"""`Workspace`: the one directory the agent's file tools may touch.

Every path a tool receives goes through `Workspace.resolve`, which resolves `..` and symlinks
(including a link whose target does not exist yet) and refuses anything that lands outside the
root with a `WorkspaceError`. The state folder (`agent.state_dir`, default `.lagoon`) is also
refused, so the agent cannot rewrite its own session.

This is confinement for the file tools, *not* a security sandbox: `bash` runs real commands with
the user's rights (eval wraps it in bubblewrap for that).
"""

from __future__ import annotations

import os
from pathlib import Path

from lagoon.errors import WorkspaceError

__all__ = ["Workspace"]


class Workspace:
    """A repository root plus the name of its state folder."""

    def __init__(self, root: str | os.PathLike[str], state_dir: str = ".lagoon") -> None:
        path = Path(root)
        if not path.is_dir():
            raise WorkspaceError(f"repository {path} does not exist or is not a folder; pass an existing --repo")
        self.root = path.resolve()
        # real path: a state folder that is (or sits under) a symlink is still recognised, and
        # one that leads out of the repository or onto its root is refused
        self.state_dir = Path(os.path.realpath(self.root / state_dir))
        if self.state_dir == self.root or self.root not in self.state_dir.parents:
            raise WorkspaceError(
                f"agent.state_dir {state_dir!r} resolves to {self.state_dir}, which is not a folder inside "
                f"the repository {self.root}; set agent.state_dir to a relative folder such as '.lagoon'"
            )

    def resolve(self, path: str | os.PathLike[str], *, allow_state: bool = False) -> Path:
        """The real absolute path of `path` (relative to the root), refused if it escapes the root."""
        raw = str(path).strip()
        if not raw:
            raise WorkspaceError("empty path; give a path relative to the repository root")
        if "\x00" in raw:
            raise WorkspaceError(f"path {raw!r} contains a NUL byte")
        candidate = Path(raw)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        real = Path(os.path.realpath(candidate))  # follows every symlink, even dangling ones
        if real != self.root and self.root not in real.parents:
            raise WorkspaceError(
                f"path {raw!r} resolves to {real}, outside the workspace {self.root}; "
                "use paths inside the repository"
            )
        if not allow_state and (real == self.state_dir or self.state_dir in real.parents):
            raise WorkspaceError(f"path {raw!r} is inside Lagoon's state folder {self.state_dir}; leave it alone")
        return real

    def relative(self, path: Path) -> str:
        """`path` relative to the root, POSIX style ('.' for the root)."""
        rel = path.relative_to(self.root)
        return rel.as_posix() or "."
