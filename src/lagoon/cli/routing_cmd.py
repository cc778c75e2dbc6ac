"""`lagoon route`, `lagoon chat` and `lagoon router fit`: the hybrid router from the command line.

- `route PROMPT`: the classification (type, confidence, the deciding rule or model) and the backend
  the router would pick, with its fallback order; no model is called.
- `chat PROMPT`: one call through the router; `--json` prints the answer, the backend that answered,
  the classification, retries and fallbacks with their reasons.
- `router fit DATA.jsonl -o FILE`: fit the learned classifier (labelled prompts or eval results),
  report held-out accuracy against the lexical rule, save it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from lagoon.cli.common import ConfigOpt, exits_cleanly, load

router_app = typer.Typer(help="Fit and inspect the task router.", no_args_is_help=True)


def _classification_dict(c: Any) -> dict[str, Any]:
    return {
        "type": c.type.value,
        "confidence": round(c.confidence, 4),
        "decided_by": c.decided_by,
        "required_capabilities": list(c.required_capabilities),
    }


@exits_cleanly
def route(
    prompt: Annotated[str, typer.Argument(help="The task, as the agent would receive it.")],
    config: ConfigOpt = None,
    context_size: Annotated[int, typer.Option("--context-size", help="Characters of retrieved context.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Classify PROMPT and show which backend the router would pick (no model is called)."""
    from lagoon.routing import build_router
    from lagoon.telemetry import Telemetry

    cfg = load(config)
    # A dry run: nothing to export, so no OTLP exporter is started.
    router = build_router(cfg, telemetry=Telemetry(cfg.telemetry.model_copy(update={"metrics_endpoint": None})))
    c = router.classify(prompt, context_size)
    order = router.route_for(c)
    backends = [
        {"route": key, "name": router.backends[key].name, "breaker": router.breakers[key].state.value} for key in order
    ]
    out = {"classification": _classification_dict(c), "backend": order[0], "order": backends}
    if as_json:
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(f"{c.type.value}  confidence {c.confidence:.2f}  decided by {c.decided_by}")
    typer.echo(f"backend: {order[0]} ({backends[0]['name']})")
    if len(backends) > 1:
        typer.echo(f"fallback: {backends[1]['route']} ({backends[1]['name']})")


@exits_cleanly
def chat(
    prompt: Annotated[str, typer.Argument(help="The message to send.")],
    config: ConfigOpt = None,
    context_size: Annotated[int | None, typer.Option("--context-size", help="Classify as a task with this much context.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Send PROMPT through the router once and print the answer (and, with --json, the route)."""
    from lagoon.errors import NoBackendAvailableError
    from lagoon.protocols import ChatMessage
    from lagoon.routing import build_router

    router = build_router(load(config))
    if context_size is not None:
        router.set_task(prompt, context_size)
    try:
        r = router.chat([ChatMessage("user", prompt)])
    except NoBackendAvailableError as exc:
        if as_json:
            typer.echo(json.dumps({"error": str(exc), "attempts": exc.attempts}, indent=2))
            raise typer.Exit(2) from None
        raise
    if as_json:
        out = {
            "answer": r.message.content,
            "tool_calls": [{"id": t.id, "name": t.name, "arguments": dict(t.arguments)} for t in r.message.tool_calls],
            "backend": r.backend,
            "model": r.model,
            "usage": {"input_tokens": r.usage.input_tokens, "output_tokens": r.usage.output_tokens, "cost_usd": r.usage.cost_usd},
            "latency_s": round(r.latency_s, 4),
            **(r.route.to_dict() if r.route else {}),
        }
        typer.echo(json.dumps(out, indent=2))
        return
    typer.echo(r.message.content)
    route = r.route
    note = f"[{r.backend}, {route.classification.type.value if route else None}, retries {route.retries if route else 0}"
    for f in route.fallbacks if route else []:
        note += f", fell back from {f.source}: {f.reason}"
    for n in route.notes if route else []:
        note += f", note: {n}"
    typer.echo(note + "]", err=True)


@router_app.command("fit")
@exits_cleanly
def fit(
    data: Annotated[str, typer.Argument(help="JSONL of labelled prompts or eval results.")],
    output: Annotated[str, typer.Option("--output", "-o", help="Where to save the classifier.")] = "router.joblib",
    config: ConfigOpt = None,
    target_strong_share: Annotated[
        float | None, typer.Option("--target-strong-share", help="Share of tasks to send to the strong model (default: the data's).")
    ] = None,
    embeddings: Annotated[
        bool | None, typer.Option("--embeddings/--no-embeddings", help="Add MiniLM prompt embeddings (default: when installed).")
    ] = None,
    holdout: Annotated[float, typer.Option("--holdout", help="Share of groups held out to report accuracy (0 skips).")] = 0.25,
    seed: Annotated[int, typer.Option("--seed")] = 0,
) -> None:
    """Fit the learned classifier on DATA, report held-out accuracy vs the lexical rule, save it."""
    from lagoon.routing.evaluation import compare_on_holdout
    from lagoon.routing.learned import LearnedClassifier, embeddings_available, load_rows

    cfg = load(config)
    rows = load_rows(data)
    use_emb = embeddings_available() if embeddings is None else embeddings
    if holdout > 0:
        report = compare_on_holdout(rows, cfg.classification, holdout=holdout, seed=seed, embeddings=use_emb,
                                    target_strong_share=target_strong_share)
        typer.echo(
            f"held-out ({report['n_test']} rows, {report['split']} split): learned {report['learned_accuracy']:.3f}  "
            f"lexical {report['lexical_accuracy']:.3f}"
        )
    model = LearnedClassifier.fit(rows, cfg.classification, target_strong_share=target_strong_share,
                                  embeddings=use_emb, seed=seed)
    path = model.save(output)
    m = model.meta
    typer.echo(
        f"saved {path} (model {m['model_id']}, {m['n_rows']} rows, embeddings {m['embeddings']}, "
        f"threshold {m['threshold']:.3f} for a strong share of {m['target_strong_share']:.2f})"
    )
    typer.echo(f"use it: -c classification.classifier=learned -c classification.model_path={path}")
