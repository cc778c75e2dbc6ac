"""`lagoon generate` and `lagoon serve`: thin commands over `lagoon.engine`."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from lagoon.cli.common import ConfigOpt, exits_cleanly, load

__all__ = ["generate", "serve"]

ModelOpt = Annotated[str | None, typer.Option("--model", "-m", help="HF folder, .gguf file or `embedded` (default: engine.model).")]
PrecisionOpt = Annotated[str | None, typer.Option("--precision", help="native | float32 | bfloat16 (default: engine.precision).")]


@exits_cleanly
def generate(
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt text.")],
    model: ModelOpt = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", "-n", min=1)] = 128,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p")] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop string (repeatable).")] = None,
    chat: Annotated[bool, typer.Option("--chat", help="Apply the model's chat template (one user turn).")] = False,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Generate all N tokens (benchmarks).")] = False,
    precision: PrecisionOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Print only the generated text (streamed), without the prompt or template."""
    from lagoon.engine.engine import engine_from_config

    cfg = load(config)
    engine = engine_from_config(cfg, model=model, precision=precision)
    try:
        ids = engine.chat_prompt([{"role": "user", "content": prompt}]) if chat else engine.encode(prompt)
        params = engine.params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                               stop=tuple(stop or ()), ignore_eos=ignore_eos,
                               **({"seed": seed} if seed is not None else {}))
        for piece in engine.stream(ids, params):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        engine.close()


@exits_cleanly
def serve(
    model: ModelOpt = None,
    host: Annotated[str | None, typer.Option("--host", help="Bind address (default: server.host).")] = None,
    port: Annotated[int | None, typer.Option("--port", help="Port (default: server.port).")] = None,
    precision: PrecisionOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Serve the model over the OpenAI-compatible API (chat, completions, models, health, metrics)."""
    from lagoon.extras import require

    for module in ("fastapi", "uvicorn", "sse_starlette"):  # before the model loads, not after
        require(module, "lagoon serve")
    from lagoon.engine.engine import engine_from_config
    from lagoon.engine.server import serve as run
    from lagoon.errors import CheckpointError
    from lagoon.telemetry import Telemetry

    cfg = load(config)
    engine = engine_from_config(cfg, model=model, precision=precision)
    try:
        typer.echo(f"serving {engine.name} on http://{host or cfg.server.host}:{port or cfg.server.port}/v1", err=True)
        try:  # built now, before any grammar: it keeps the family's syntax tokens in decoded text
            typer.echo(f"tool calls in the {engine.chat_format.tool_syntax.name} syntax (from the chat template)", err=True)
        except CheckpointError:
            typer.echo("no chat template: /v1/completions only", err=True)
        run(engine, cfg.server, Telemetry(cfg.telemetry), host=host, port=port)
    finally:
        engine.close()
