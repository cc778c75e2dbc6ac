"""`--model SPEC` for `lagoon run`, `lagoon sessions resume` and `lagoon eval`, parsed in one place.

    router          the configured backends behind the router (`lagoon.agent.build_model`); the default
    scripted:FILE   a JSON list of replies (`lagoon.testing.ReplayChatModel`): the same script for
                    the one task of `lagoon run`, or for every task of `lagoon eval`
    scripted:DIR    `lagoon eval` only: task T replays DIR/T.json (`lagoon.eval.trial.ScriptedModels`)

A wrong kind lists the valid ones; a scripted path that does not exist says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lagoon.errors import ConfigError
from lagoon.registry import Registry

__all__ = ["ModelSpec", "MODEL_KINDS"]

MODEL_KINDS: Registry[str] = Registry(
    "model kind",
    {"router": "the configured backends", "scripted": "scripted:FILE (JSON replies) or scripted:DIR (eval)"},
    where="--model",
)


@dataclass(frozen=True)
class ModelSpec:
    kind: str
    path: Path | None = None

    @classmethod
    def parse(cls, spec: str) -> ModelSpec:
        kind, _, arg = spec.partition(":")
        MODEL_KINDS.check(kind)
        if kind == "router":
            if arg:
                raise ConfigError(f"--model {spec!r}: router takes no argument (its backends come from the config)")
            return cls(kind)
        if not arg:
            raise ConfigError(f"--model {spec!r}: scripted needs a path: scripted:FILE.json or scripted:DIR")
        path = Path(arg)
        if not path.exists():
            raise ConfigError(f"--model {spec!r}: {path} does not exist; pass a JSON script or a folder of them")
        return cls(kind, path)

    def model(self, config: Any, *, replies_so_far: int = 0) -> Any:
        """The ChatModel for one task (`lagoon run`, `sessions resume`); a script continues after the
        `replies_so_far` a resumed session already holds."""
        if self.kind == "router":
            from lagoon.agent import build_model

            return build_model(config)
        if self.path is not None and self.path.is_dir():
            raise ConfigError(f"--model scripted:{self.path}: a folder scripts one model per eval task; "
                              "`lagoon run` takes scripted:FILE.json")
        from lagoon.testing import ReplayChatModel

        return ReplayChatModel.from_file(str(self.path), start=replies_so_far)

    def factory(self) -> Any:
        """The per-task model factory for `lagoon eval` (None: the configured router in each trial)."""
        if self.kind == "router":
            return None
        from lagoon.eval.trial import ScriptedModels

        return ScriptedModels(self.path)  # type: ignore[arg-type]
