"""Options and helpers shared by every command: the `-c` config layers and clean error exits."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from lagoon.errors import LagoonError

F = TypeVar("F", bound=Callable[..., Any])

err_console = Console(stderr=True)

ConfigOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--config",
        "-c",
        help="A YAML config file or a section.key=value override; repeat to layer them in order.",
    ),
]


def load(layers: list[str] | None):
    """Merge the `-c` layers into a LagoonConfig (ConfigError on bad input)."""
    from lagoon.config import load_config

    return load_config(*(layers or []))


def exits_cleanly(fn: F) -> F:
    """Turn a LagoonError into its message on stderr and exit code 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LagoonError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
