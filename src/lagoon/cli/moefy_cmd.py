"""`lagoon moefy SOURCE OUT`: split a dense checkpoint's FFNs into experts (`lagoon.moe.moefy`) and
report its fidelity against the dense model on held-out text."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lagoon.cli.common import exits_cleanly


@exits_cleanly
def moefy(
    source: Annotated[str, typer.Argument(help="Dense checkpoint: HF folder, .gguf, or `embedded`.")],
    out: Annotated[Path, typer.Argument(help="Folder to write the MoE checkpoint to.")],
    experts: Annotated[int, typer.Option("--experts", "-e", min=1, help="Experts per FFN (must divide its width).")] = 8,
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Experts routed per token.")] = 4,
    seed: Annotated[int, typer.Option(help="k-means seed.")] = 0,
    calibration: Annotated[Path | None, typer.Option(help="Text for the router centroids (default: the shipped sample).")] = None,
    no_calibration: Annotated[bool, typer.Option("--no-calibration", help="Data-free router (gate-vector centroids).")] = False,
    report: Annotated[list[int] | None, typer.Option("--report", "-r", help="Also score this k on held-out text (repeatable).")] = None,
) -> None:
    """Moefy a dense model: neurons clustered into experts, routed by centroid similarity; saved as a
    HF folder `lagoon generate/serve/quantize/moe` load. --report k prints KL / top-1 / perplexity."""
    from lagoon.moe.moefy import build

    folder = build(source, out, experts, top_k, seed, None if no_calibration else (calibration or "default"))
    typer.echo(f"wrote {folder} ({experts} experts, top-{top_k})")
    if report:
        from lagoon.moe.moefy import fidelity_table

        rows = fidelity_table(source, folder, report)
        typer.echo(f"{'k':>3} {'top-1':>7} {'KL':>8} {'ppl dense':>10} {'ppl moe':>10} {'delta':>8}")
        for r in rows:
            typer.echo(f"{r['k']:>3} {r['top1']:>7.3f} {r['kl']:>8.4f} {r['ppl_dense']:>10.3f} {r['ppl_moe']:>10.3f} "
                       f"{r['ppl_delta_pct']:>7.2f}%")
        from lagoon.atomic import write_json_atomic

        write_json_atomic(folder / "fidelity.json", rows)
