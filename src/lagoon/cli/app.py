"""The `lagoon` command: one typer app with a sub-app or command per file in this package."""

from __future__ import annotations

import logging

import typer

from lagoon.cli import (
    agent_cmd,
    config_cmd,
    context_cmd,
    engine_cmd,
    eval_cmd,
    moe_cmd,
    moefy_cmd,
    quant_cmd,
    routing_cmd,
    stats_cmd,
)

app = typer.Typer(
    name="lagoon",
    help="Lagoon: a sparse-MoE engine, a context-engineered coding agent, hybrid routing, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
app.add_typer(config_cmd.app, name="config")
app.command("route")(routing_cmd.route)
app.command("chat")(routing_cmd.chat)
app.add_typer(routing_cmd.router_app, name="router")
app.command("run")(agent_cmd.run)
app.add_typer(agent_cmd.sessions_app, name="sessions")
app.command("eval")(eval_cmd.eval_command)
app.command("index")(context_cmd.index)
app.command("generate")(engine_cmd.generate)
app.command("serve")(engine_cmd.serve)
app.command("search")(context_cmd.search)
app.add_typer(moe_cmd.app, name="moe")
app.command("moefy")(moefy_cmd.moefy)
app.command("quantize")(quant_cmd.quantize)
app.add_typer(quant_cmd.app, name="quant")
app.command("stats")(stats_cmd.stats)
app.add_typer(stats_cmd.metrics_app, name="metrics")


@app.callback()
def _root(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level.")) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@app.command()
def version() -> None:
    """Print Lagoon's version."""
    from lagoon import __version__

    typer.echo(__version__)


def main() -> None:
    app()
