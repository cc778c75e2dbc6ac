"""`lagoon config validate FILE...` and `lagoon config show [-c ...]`."""

from __future__ import annotations

import json
from typing import Annotated

import typer
import yaml
from rich.console import Console

from lagoon.cli.common import ConfigOpt, exits_cleanly, load

app = typer.Typer(help="Validate and inspect Lagoon configuration.", no_args_is_help=True)


@app.command()
def validate(files: Annotated[list[str], typer.Argument(help="YAML config files to check.")]) -> None:
    """Exit 0 when every file is a valid config; otherwise print each problem and exit 2."""
    from lagoon.config import load_config
    from lagoon.errors import ConfigError

    failed = False
    for f in files:
        try:
            load_config(f)
        except ConfigError as exc:
            failed = True
            typer.echo(str(exc), err=True)
        else:
            typer.echo(f"{f}: ok")
    if failed:
        raise typer.Exit(2)


@app.command()
@exits_cleanly
def show(
    config: ConfigOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="yaml or json.")] = "yaml",
    camel: Annotated[bool, typer.Option(help="Print camelCase keys.")] = False,
) -> None:
    """Print the merged effective config (defaults, then each -c layer in order)."""
    data = load(config).dump(camel=camel)
    if fmt == "json":
        typer.echo(json.dumps(data, indent=2))
    else:
        Console().print(yaml.safe_dump(data, sort_keys=False), markup=False, highlight=False)


@app.command()
def keys(section: Annotated[str | None, typer.Argument(help="Only keys under this section, e.g. context.")] = None) -> None:
    """List every config key with its default and its documentation."""
    from rich.table import Table

    from lagoon.config import LagoonConfig, config_keys, describe_key

    defaults = LagoonConfig().dump()
    table = Table("key", "default", "meaning", show_lines=False)
    for key in config_keys():
        if section and not key.startswith(section.rstrip(".") + "."):
            continue
        value: object = defaults
        for part in key.split("."):
            value = value[part]  # type: ignore[index]
        table.add_row(key, json.dumps(value), describe_key(key))
    Console(width=160).print(table)
