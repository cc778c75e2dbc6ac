"""`Registry`: short name → implementation, for every plug-in point (backends, classifiers,
executors, eval agents, CLI model kinds, MoE expert impls, ...).

An entry is the object itself or a ``"module:attr"`` string imported on first `load` (so naming a
backend does not import its SDK). A wrong name raises the registry's error class (a `ConfigError`
unless told otherwise) that lists the valid names — the one place that message is written:

    EXECUTORS = Registry("executor", {"local": LocalExecutor, "ray": RayExecutor})
    EXECUTORS.load("dask")   # ConfigError: unknown executor 'dask'; valid: local, ray

A `Registry` is a read-only mapping of the raw entries (iteration gives the names in order).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

from lagoon.errors import ConfigError, LagoonError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Mapping[str, Any], Generic[T]):
    def __init__(
        self, kind: str, entries: Mapping[str, T | str], *, error: type[LagoonError] = ConfigError, where: str = ""
    ) -> None:
        self.kind = kind
        self.error = error
        self.where = where  # e.g. "eval.executor": prefixes the message so it names the config key
        self._entries = dict(entries)

    def __getitem__(self, name: str) -> T | str:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"

    def check(self, name: str) -> str:
        """`name` if it is registered, else the error listing the valid names."""
        if name not in self._entries:
            prefix = f"{self.where}: " if self.where else ""
            raise self.error(f"{prefix}unknown {self.kind} {name!r}; valid: {', '.join(self._entries)}")
        return name

    def load(self, name: str) -> T:
        """The entry for `name`, importing a ``"module:attr"`` string on first use."""
        entry = self._entries[self.check(name)]
        if isinstance(entry, str) and ":" in entry:
            module, _, attr = entry.partition(":")
            entry = self._entries[name] = getattr(importlib.import_module(module), attr)
        return entry  # type: ignore[return-value]
