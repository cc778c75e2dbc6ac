"""Write a run's summary and a self-contained HTML report.

`write_report(out_dir, results, summary)` writes ``summary.json`` (the `metrics.summarize` dict,
which carries ``format_version``) and ``report.html``: headline numbers, a per-task table and
matplotlib plots embedded as base64 PNGs — pass rate by category (with Wilson intervals), the
steps histogram, cost against pass, the share of calls routed to each backend, and expert load when
the local model is MoE. Both files are written to a temporary name and renamed, so a reader never
sees half a report. The HTML needs nothing but itself to render (no scripts, no external files).
"""

from __future__ import annotations

import base64
import contextlib
import html
import io
import json
import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from lagoon.atomic import write_atomic
from lagoon.eval.result import TrialResult

__all__ = ["write_report", "render_html", "plots"]


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


@contextlib.contextmanager
def _quiet_matplotlib() -> Iterator[None]:
    """Keep matplotlib's warnings (Python warnings and its logger: font cache, empty legends, odd
    limits) off the user's terminal; a report is written either way and says what it could plot."""
    logger = logging.getLogger("matplotlib")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def plots(results: Sequence[TrialResult], summary: Mapping[str, Any]) -> dict[str, str]:
    """Plot title → base64 PNG. Routing share and expert load appear only when there is data."""
    with _quiet_matplotlib():
        return _plots(results, summary)


def _plots(results: Sequence[TrialResult], summary: Mapping[str, Any]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    cats = summary.get("by_category") or {}
    if cats:
        names = list(cats)
        rates = [cats[c]["pass_rate"] for c in names]
        # Wilson bounds can sit a rounding error past the rate at 0 and 1; matplotlib rejects < 0
        lows = [max(0.0, r - cats[c]["ci95"][0]) for c, r in zip(names, rates, strict=True)]
        highs = [max(0.0, cats[c]["ci95"][1] - r) for c, r in zip(names, rates, strict=True)]
        err = [lows, highs]
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(names, rates, yerr=err, capsize=4, color="#3b7dd8")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("pass rate (95% CI)")
        ax.tick_params(axis="x", rotation=30)
        out["Pass rate by category"] = _png(fig)

    scored = [r for r in results if r.scored]
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.hist([float(r.steps) for r in scored] or [0], bins=min(20, max(1, len(scored))), color="#5a9e6f")
    ax.set_xlabel("steps per task")
    ax.set_ylabel("tasks")
    out["Steps histogram"] = _png(fig)

    fig, ax = plt.subplots(figsize=(6, 3))
    plotted = False
    for ok, colour, label in ((True, "#2e8b57", "passed"), (False, "#c0392b", "failed")):
        pts = [(r.cost_usd, float(r.tokens.total)) for r in scored if r.passed == ok]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], c=colour, label=label, alpha=0.8)
            plotted = True
    ax.set_xlabel("cost per task (USD)")
    ax.set_ylabel("tokens")
    if plotted:  # a legend of nothing is a matplotlib warning
        ax.legend(loc="best")
    out["Cost vs pass"] = _png(fig)

    share = summary.get("routing_share") or {}
    if share:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.bar(list(share), list(share.values()), color="#8e6cc1")
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("share of model calls")
        out["Routing share"] = _png(fig)

    load = summary.get("expert_load")
    if load:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.bar(range(len(load)), load, color="#d98c3b")
        ax.axhline(sum(load) / len(load), color="k", lw=1, ls="--", label="even share")
        ax.set_xlabel("expert")
        ax.set_ylabel("tokens routed")
        ax.legend(loc="best")
        out["Expert load"] = _png(fig)
    return out


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def render_html(results: Sequence[TrialResult], summary: Mapping[str, Any], title: str = "Lagoon eval") -> str:
    e = html.escape
    ci = summary.get("pass_rate_ci95") or [None, None]
    headline = [
        ("agents", ", ".join(summary.get("agents") or [])),
        ("tasks (trials)", f"{summary.get('tasks')} ({summary.get('trials')})"),
        ("pass rate", f"{_fmt(summary.get('pass_rate'))} [95% CI {_fmt(ci[0])} – {_fmt(ci[1])}]"),
        ("pass@k", ", ".join(f"@{k}: {v:.3f}" for k, v in (summary.get("pass_at_k") or {}).items())),
        ("mean steps", _fmt((summary.get("steps") or {}).get("mean"))),
        ("command success rate", _fmt(summary.get("command_success_rate"))),
        ("tokens", _fmt((summary.get("tokens") or {}).get("total"))),
        ("cost per task / per solved (USD)", f"{_fmt(summary['cost_usd']['per_task'])} / {_fmt(summary['cost_usd']['per_solved_task'])}"),
        ("latency p50 / p95 (ms)", f"{_fmt(summary['latency_ms']['p50'])} / {_fmt(summary['latency_ms']['p95'])}"),
        ("validation failures", _fmt(summary["validation_failures"]["total"])),
        ("environment unsupported", ", ".join(summary.get("environment_unsupported") or []) or "none"),
        ("held out from fitting", _fmt(summary.get("held_out"))),
    ]
    if summary.get("fidelity"):
        headline.append(("quantization fidelity", json.dumps(summary["fidelity"], sort_keys=True)))
    rows = "".join(f"<tr><th>{e(k)}</th><td>{e(str(v))}</td></tr>" for k, v in headline)
    figs = "".join(
        f'<figure><img alt="{e(name)}" src="data:image/png;base64,{png}"><figcaption>{e(name)}</figcaption></figure>'
        for name, png in plots(results, summary).items()
    )
    cols = ("task_id", "attempt", "category", "status", "reward", "steps", "command_success_rate", "cost_usd", "failure_mode")
    table = "".join(
        "<tr>" + "".join(f"<td>{e(_fmt(getattr(r, c)))}</td>" for c in cols) + "</tr>"
        for r in sorted(results, key=lambda r: (r.task_id, r.attempt))
    )
    head = "".join(f"<th>{e(c)}</th>" for c in cols)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{e(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1100px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:left}}figure{{display:inline-block;margin:1em}}</style>
</head><body><h1>{e(title)}</h1>
<table>{rows}</table>
<h2>Plots</h2>{figs}
<h2>Tasks</h2><table><tr>{head}</tr>{table}</table>
<p>summary format_version {e(str(summary.get('format_version')))}</p>
</body></html>
"""


def write_report(
    out_dir: str | Path, results: Sequence[TrialResult], summary: Mapping[str, Any], *, title: str = "Lagoon eval"
) -> tuple[Path, Path]:
    """Write summary.json and report.html into `out_dir`; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary_path, report_path = out / "summary.json", out / "report.html"
    write_atomic(summary_path, json.dumps(summary, indent=2, sort_keys=True, default=list) + "\n")
    write_atomic(report_path, render_html(results, summary, title))
    return summary_path, report_path
