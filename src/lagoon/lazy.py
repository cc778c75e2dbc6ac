"""A package's names loaded on first use from its submodules (PEP 562), so importing the package does
not import every submodule: the warm start imports `lagoon.config` and `lagoon.quant` for one or two
names each (see docs/architecture.md, "Warm start")."""

from __future__ import annotations

import importlib
import sys
import typing
from collections.abc import Callable


def lazy_names(package: str, homes: dict[str, str]) -> tuple[Callable[[str], typing.Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, each name in `homes` imported from
    `package.<homes[name]>` when first read and then kept in the package's namespace."""
    module = sys.modules[package]

    def __getattr__(name: str) -> typing.Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{homes[name]}"), name)
        setattr(module, name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(module), *homes})

    return __getattr__, __dir__
