"""`--model SPEC` for `lagoon run`, `lagoon sessions resume` and `lagoon eval`, parsed in one place.

    router          the configured backends behind the router (`lagoon.agent.build_model`); the default
    scripted:FILE   a JSON list of replies (`lagoon.testing.ReplayChatModel`): the same script for
                    the one task of `lagoon run`, or for every task of `lagoon eval`
    scripted:DIR    `lagoon eval`: task T replays DIR/T.json (`lagoon.eval.trial.ScriptedModels`);
                    `lagoon run` with agent.mode=coordinated: role R replays DIR/R.json

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

    def role_models(self, config: Any) -> Any:
        """`models(role, replies_so_far)` for `agent.mode: coordinated`: one router for every role, or
        a script per role (DIR/retriever.json, DIR/coder.json, DIR/verifier.json)."""
        if self.kind == "router":
            from lagoon.agent import build_model

            router = build_model(config)
            return lambda role, replies_so_far: router
        if self.path is None or not self.path.is_dir():
            raise ConfigError(f"--model scripted:{self.path}: coordinated mode scripts one model per role; "
                              "pass a folder holding retriever.json, coder.json and verifier.json")
        from lagoon.testing import ReplayChatModel

        folder = self.path
        missing = [r for r in ("retriever", "coder", "verifier") if not (folder / f"{r}.json").is_file()]
        if missing:
            raise ConfigError(f"--model scripted:{folder}: no script for {', '.join(missing)} "
                              f"(expected {', '.join(f'{r}.json' for r in missing)})")
        return lambda role, replies_so_far: ReplayChatModel.from_file(str(folder / f"{role}.json"),
                                                                      start=replies_so_far, name=role)

    def factory(self) -> Any:
        """The per-task model factory for `lagoon eval` (None: the configured router in each trial)."""
        if self.kind == "router":
            return None
        from lagoon.eval.trial import ScriptedModels

        return ScriptedModels(self.path)  # type: ignore[arg-type]
