"""`lagoon index REPO` (build or update the retrieval index, with a progress bar) and
`lagoon search REPO "query" -k 5 [--json] [--files]` (print path, lines, symbol and score per hit;
with --files, the ranked files instead, each with its best chunk)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from lagoon.cli.common import ConfigOpt, exits_cleanly, load

RepoArg = Annotated[Path, typer.Argument(help="Root of the repository.", file_okay=False)]


@exits_cleanly
def index(
    repo: RepoArg,
    rebuild: Annotated[
        bool, typer.Option("--rebuild", help="Ignore the existing index and build anew.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Build or incrementally update REPO's index under REPO/<agent.state_dir>/index/."""
    from lagoon.context.index import CodeIndex

    cfg = load(config)
    ix = CodeIndex(repo, cfg.context, state_dir=cfg.agent.state_dir)
    console = Console(stderr=True)
    columns = (
        TextColumn("indexing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, path: str) -> None:
            if done % 25 == 0 or done == total:
                bar.update(task, completed=done, total=total, description=path[-60:])

        stats = ix.update(rebuild=rebuild, progress=progress)
    typer.echo(
        f"{stats.files} files, {stats.chunks} chunks "
        f"(+{stats.added} ~{stats.changed} -{stats.removed} files, {stats.reparsed_chunks} chunks parsed) "
        f"in {stats.seconds:.2f} s" + ("" if stats.written else "; already up to date")
    )


@exits_cleanly
def search(
    repo: RepoArg,
    query: Annotated[str, typer.Argument(help="What to look for (words, identifiers, an issue text).")],
    k: Annotated[int, typer.Option("-k", min=1, help="How many hits to print.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    rerank: Annotated[
        bool | None, typer.Option("--rerank/--no-rerank", help="Override context.rerank.")
    ] = None,
    files: Annotated[
        bool, typer.Option("--files", help="Rank files (BM25 only; test files left out) instead of chunks.")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Search REPO's index (updating it first): path, lines, symbol and score per hit."""
    from lagoon.context.retriever import CodeRetriever

    full = load(config)
    cfg = full.context
    if rerank is not None:
        cfg = cfg.model_copy(update={"rerank": rerank})
    cfg = cfg.model_copy(update={"lexical_candidates": max(cfg.lexical_candidates, k)})
    retriever = CodeRetriever(repo, cfg, state_dir=full.agent.state_dir)
    if files:
        from lagoon.context.index import Hit

        hits = [Hit(f.hits[0].chunk, f.score) for f in retriever.files(query, k)]
    else:
        hits = retriever.candidates(query)[:k]
    rows = [
        {
            "path": h.chunk.path,
            "start_line": h.chunk.start_line,
            "end_line": h.chunk.end_line,
            "symbol": h.chunk.symbol,
            "score": round(h.score, 4),
        }
        for h in hits
    ]
    if as_json:
        typer.echo(json.dumps({"query": query, "hits": rows}, indent=2))
        return
    table = Table("path", "lines", "symbol", "score")
    for r in rows:
        table.add_row(r["path"], f"{r['start_line']}-{r['end_line']}", r["symbol"] or "", f"{r['score']:.3f}")
    Console().print(table)
