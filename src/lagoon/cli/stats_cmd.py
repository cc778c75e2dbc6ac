"""`lagoon stats [--json]` and `lagoon metrics serve`: the daily figures every run and route keep.

`stats` prints, from `lagoon.stats.StatsStore` (`telemetry.stats_path`), the rolling day (task
classifications and the reasoning-bound share against `telemetry.reasoning_share_alert`,
validation pass rate, assumption drift), the alert states, and one row per recent day.
`metrics serve` exposes the same figures at `/metrics` for Prometheus, read at every scrape.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from lagoon.cli.common import ConfigOpt, exits_cleanly, load

metrics_app = typer.Typer(help="Expose the daily agent and router figures to Prometheus.", no_args_is_help=True)


def _store(config: Any) -> Any:
    from lagoon.stats import StatsStore

    return StatsStore(config.telemetry.stats_path or None)


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.0%}"


@exits_cleanly
def stats(
    config: ConfigOpt = None,
    days: Annotated[int, typer.Option("--days", help="How many recent days to list.")] = 7,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Classification ratios, validation pass rates and assumption drift, per day and over the rolling day."""
    from lagoon.routing.metrics import MIN_SAMPLES

    cfg = load(config)
    store = _store(cfg)
    try:
        window, per_day, alerts = store.window(), store.days(days), list(store.alerts())
    finally:
        store.close()
    limit = cfg.telemetry.reasoning_share_alert
    over = window.tasks >= MIN_SAMPLES and window.reasoning_share > limit
    if as_json:
        typer.echo(json.dumps({"path": str(store.path), "rolling_day": window.to_dict(), "limit": limit,
                               "min_samples": MIN_SAMPLES, "over_limit": over, "alerts": alerts,
                               "days": [{"day": d.day, **d.to_dict()} for d in per_day]}, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"stats: {store.path}")
    console.print(f"rolling day: {window.tasks} tasks, reasoning-bound {_pct(window.reasoning_share)} "
                  f"(alert above {limit:.0%} once {MIN_SAMPLES} tasks are in), validations passed "
                  f"{_pct(window.validation_pass_rate)}, assumption drift {window.assumption_drift}")
    for a in alerts:
        if a["firing"]:
            console.print(f"[bold red]ALERT {a['name']}[/]: {a['message']}")
    table = Table(title="per day (UTC)")
    for col in ("day", "tasks", "reasoning", "retrieval", "reasoning share", "validations", "pass rate", "drift"):
        table.add_column(col)
    for d in per_day:
        table.add_row(d.day, str(d.tasks), str(d.classifications.get("reasoning_bound", 0)),
                      str(d.classifications.get("retrieval_bound", 0)), _pct(d.reasoning_share if d.tasks else None),
                      str(d.validations_passed + d.validations_failed), _pct(d.validation_pass_rate),
                      str(d.assumption_drift))
    console.print(table)


def metrics_server(store: Any, host: str, port: int) -> Any:
    """A WSGI server answering /metrics from `store` (call `serve_forever`; `server_port` is the port)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client import CollectorRegistry, make_wsgi_app

    registry = CollectorRegistry(auto_describe=False)
    registry.register(store.collector())
    metrics = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("PATH_INFO") not in ("/metrics", "/metrics/"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"only /metrics is served here\n"]
        return metrics(environ, start_response)

    class Quiet(WSGIRequestHandler):
        def log_message(self, *args: Any) -> None:  # a scrape every few seconds is not news
            pass

    return make_server(host, port, app, handler_class=Quiet)


@metrics_app.command("serve")
@exits_cleanly
def serve(
    config: ConfigOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port (0: any free one).")] = 9464,
) -> None:
    """Serve the daily figures (classifications, reasoning share, validations, drift, alerts) at /metrics."""
    server = metrics_server(_store(load(config)), host, port)
    typer.echo(f"serving http://{host}:{server.server_port}/metrics", err=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
