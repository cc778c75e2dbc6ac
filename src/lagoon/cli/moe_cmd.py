"""`lagoon moe bench | placement LOADS.json | simulate | info | stats MODEL`: the MoE block's speed,
placement and balance, a loaded model's parameters and expert offloading, and its expert
utilization on real text."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from lagoon.atomic import write_json_atomic
from lagoon.cli.common import ConfigOpt, exits_cleanly, load

app = typer.Typer(help="Sparse MoE: benchmark, expert placement, load-balance simulation, model info.", no_args_is_help=True)


def _read_loads(path: Path) -> list[list[float]]:
    from lagoon.errors import ConfigError

    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; pass a JSON [layers][experts] array or a monitor snapshot") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict) and "layers" in data:  # an ExpertLoadMonitor snapshot
        return [layer["tokens"] for layer in data["layers"]]
    if isinstance(data, list) and data and not isinstance(data[0], list):
        return [data]
    if isinstance(data, list) and data:
        return data
    raise ConfigError(f"{path}: expected [layers][experts] numbers, [experts] numbers, or a monitor snapshot")


@app.command()
def bench(
    quick: Annotated[bool, typer.Option("--quick", help="Two shapes, 1 and 128 tokens, fewer repetitions.")] = False,
    threads: Annotated[int, typer.Option(help="torch intra-op threads.")] = 2,
) -> None:
    """Time Lagoon's MoE block against transformers' eager and grouped_mm paths; balancing on/off table."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lagoon.moe.benchmark import run

    run(quick=quick, threads=threads, echo=typer.echo)


@app.command()
@exits_cleanly
def placement(
    loads: Annotated[Path, typer.Argument(help="JSON: [layers][experts] token counts, or a `simulate --json` snapshot.")],
    devices: Annotated[int, typer.Option("--devices", "-d", help="Expert-parallel devices.")] = 8,
    redundant: Annotated[int, typer.Option("--redundant", "-r", help="Extra replica slots for hot experts.")] = 0,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write the placement JSON here.")] = None,
    fmt: Annotated[str, typer.Option("--format", "-f", help="lagoon | sglang (--init-expert-location) | vllm (EplbState maps).")] = "lagoon",
) -> None:
    """Plan an EPLB-style expert placement (replicate hot experts, pack devices) and print its balance.
    LOADS may be `lagoon moe stats --json` output."""
    from rich.console import Console
    from rich.table import Table

    from lagoon.errors import ConfigError
    from lagoon.moe.placement import plan_placement

    writers = {"lagoon": "to_json", "sglang": "to_sglang", "vllm": "to_vllm"}
    if fmt not in writers:
        raise ConfigError(f"--format {fmt!r} is unknown; choose one of {', '.join(writers)}")
    plan = plan_placement(_read_loads(loads), devices, redundant)
    table = Table("layer", "replicated experts", "device load (min..max)", "balancedness")
    for i, (reps, dev) in enumerate(zip(plan.replicas, plan.device_load, strict=True)):
        hot = [str(e) for e in range(len(reps)) if reps[e] > 1]
        table.add_row(str(i), ", ".join(hot) or "-", f"{dev.min():.0f}..{dev.max():.0f}", f"{dev.mean() / max(dev.max(), 1e-12):.3f}")
    Console().print(table)
    typer.echo(f"balancedness: naive {plan.balancedness_before:.3f} -> planned {plan.balancedness_after:.3f}")
    if out is not None:
        write_json_atomic(out, getattr(plan, writers[fmt])())
        typer.echo(f"wrote {out}")


@app.command()
@exits_cleanly
def simulate(
    config: ConfigOpt = None,
    layers: Annotated[int, typer.Option(help="MoE blocks in the stack.")] = 4,
    hidden: Annotated[int, typer.Option(help="Hidden size of the random blocks.")] = 128,
    intermediate: Annotated[int, typer.Option(help="Expert intermediate size.")] = 64,
    steps: Annotated[int, typer.Option(help="Forward calls.")] = 50,
    tokens: Annotated[int, typer.Option(help="Tokens per call.")] = 16,
    skew: Annotated[float, typer.Option(help="Norm scale of the offset every token shares (0 = no skew).")] = 2.0,
    seed: int = 0,
    plot: Annotated[Path | None, typer.Option(help="Write the layer x expert heat map PNG here.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the monitor snapshot here.")] = None,
) -> None:
    """Run random MoE blocks built from the config (routing + moe sections) and report expert load."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from lagoon.moe import ExpertLoadMonitor, SparseMoE

    cfg = load(config)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        *[SparseMoE.from_config(cfg, hidden_size=hidden, intermediate_size=intermediate) for _ in range(layers)]
    ).eval()
    monitor = ExpertLoadMonitor.from_config(cfg).attach(model)
    g = torch.Generator().manual_seed(seed)
    offset = torch.randn(hidden, generator=g) * skew
    with torch.no_grad():
        for _ in range(steps):
            model(offset + torch.randn(tokens, hidden, generator=g))
    snap = monitor.snapshot()
    table = Table("layer", "balancedness", "CV", "max violation", "entropy (norm)", "dropped", "recalibrations")
    for layer in snap["layers"]:
        table.add_row(
            layer["name"], f"{layer['balancedness']:.3f}", f"{layer['cv']:.3f}", f"{layer['max_violation']:.2f}",
            f"{layer['entropy_norm']:.3f}", str(layer["dropped"]), str(layer["recalibrations"]),
        )
    Console().print(table)
    if plot is not None:
        typer.echo(f"wrote {monitor.plot(plot)}")
    if json_out is not None:
        write_json_atomic(json_out, snap)
        typer.echo(f"wrote {json_out}")


@app.command()
@exits_cleanly
def info(
    model: Annotated[str | None, typer.Option("--model", "-m", help="HF folder, .gguf or `embedded` (default: engine.model).")] = None,
    config: ConfigOpt = None,
    tokens: Annotated[int, typer.Option(help="Decode this many tokens first (offload counters need traffic).")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")] = False,
) -> None:
    """Total / active parameters against model_deployment's declaration, and expert-offload stats."""
    import logging
    import time

    from lagoon.engine.engine import engine_from_config
    from lagoon.moe.footprint import check_declaration
    from lagoon.moe.offload import offload_of

    cfg = load(config)
    if not tokens and cfg.engine.compile is None:
        cfg.engine.compile = False  # nothing is decoded: do not compile (or load) a decode step
    quiet = logging.getLogger("lagoon.moe.footprint")
    quiet.disabled = True  # the load checks too; the report below is the one shown
    try:
        engine = engine_from_config(cfg, model=model)
    finally:
        quiet.disabled = False
    try:
        report = check_declaration(engine.model, cfg.model_deployment).to_json()
        report["model"] = engine.name
        if tokens:
            params = engine.params(max_new_tokens=tokens, ignore_eos=True)
            start = time.perf_counter()
            done = engine.complete("def fibonacci(n):", params)
            report["decode"] = {"tokens": done.completion_tokens,
                                "tokens_per_s": done.completion_tokens / (time.perf_counter() - start)}
        off = offload_of(engine.model)
        report["offload"] = off.stats() if off is not None else None
        from lagoon.moe.runtime import runtime_of

        rt = runtime_of(engine.model)
        report["runtime"] = rt.stats() if rt is not None else None
    finally:
        engine.close()
    if json_out:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{report['model']} (variant {report['variant']}): {report['architecture']['actual']}, "
               f"{report['moe_layers']} MoE layers x {report['num_experts']} experts, top-{report['top_k']}")
    for kind in ("total", "active"):
        p = report[f"{kind}_parameters"]
        declared = "undeclared" if p["declared"] is None else f"declared {p['declared']:,.0f} (off by {p['off_by']:.1%})"
        typer.echo(f"{kind} parameters: {p['actual']:,}  {declared}")
    for line in report["warnings"] + report["notes"]:
        typer.echo(f"! {line}")
    if report["runtime"]:
        rt = report["runtime"]
        typer.echo(f"routing: balancing {'on' if rt['balancing'] else 'off'} (window {rt['window']}), "
                   f"{rt['recalibrations']} recalibrations, {len(rt['quarantined'])} experts quarantined")
        for q in rt["quarantined"]:
            typer.echo(f"  quarantined: layer {q['layer']} expert {q['expert']} ({q['reason']})")
    if report.get("decode"):
        typer.echo(f"decode: {report['decode']['tokens']} tokens, {report['decode']['tokens_per_s']:.1f} tok/s")
    if report["offload"]:
        s = report["offload"]
        typer.echo(f"offload: capacity {s['capacity']}/{s['num_experts']} ({s['policy']}, {s['tier']}), hit rate "
                   f"{s['hit_rate']:.1%}, misses {s['misses']}, prefetched {s['prefetch_loads']} "
                   f"({s['prefetch_accuracy']:.1%} used), speculative accuracy {s['speculative_accuracy']:.1%}, "
                   f"{s['bytes_loaded'] / 2**20:.1f} MiB moved")


@app.command()
@exits_cleanly
def stats(
    model: Annotated[str, typer.Argument(help="MoE checkpoint: HF folder, or `embedded-moe`.")],
    text: Annotated[Path | None, typer.Option("--text", help="Text to run (default: the shipped ~1,000-token coding sample).")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the utilization JSON here.")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Write the layer x expert heat map PNG here.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Per-layer expert utilization of a real model on real text: CV, max/mean, entropy,
    balancedness, and whether the recalibration rule (moe.recalibration_cv) would fire."""
    from rich.console import Console
    from rich.table import Table

    from lagoon.engine.engine import engine_from_config
    from lagoon.errors import ConfigError
    from lagoon.moe.utilization import CODING_SAMPLE, measure_utilization

    cfg = load(config)
    source = text or CODING_SAMPLE
    try:
        body = source.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"--text {source}: unreadable ({exc}); pass a UTF-8 text file") from exc
    if cfg.engine.compile is None:
        cfg.engine.compile = False  # the text runs through the model's forward, never the decode step
    engine = engine_from_config(cfg, model=model)
    try:
        ids = engine.encode(body)
        if len(ids) < 2:
            raise ConfigError(f"--text {source}: fewer than 2 tokens; give more text")
        snap, monitor = measure_utilization(engine.model, ids, recalibration_cv=cfg.moe.recalibration_cv)
    finally:
        engine.close()
    snap["model"], snap["text"] = engine.name, str(source)
    table = Table("layer", "CV", "max/mean", "entropy (norm)", "balancedness", "recalibrate?")
    for layer in snap["layers"]:
        table.add_row(layer["name"], f"{layer['cv']:.3f}", f"{layer['max_over_mean']:.2f}",
                      f"{layer['entropy_norm']:.3f}", f"{layer['balancedness']:.3f}",
                      "yes" if layer["would_recalibrate"] else "no")
    Console().print(table)
    n, thr = len(snap["would_recalibrate"]), snap["recalibration_cv"]
    typer.echo(f"{snap['model']} on {len(ids)} tokens of {source.name}: overall balancedness "
               f"{snap['overall']['balancedness']:.3f}; " + (
                   "recalibration off" if thr is None else
                   f"{n} of {len(snap['layers'])} layers over CV {thr:.0%} would trigger recalibration"))
    if json_out is not None:
        write_json_atomic(json_out, snap)
        typer.echo(f"wrote {json_out}")
    if plot is not None:
        typer.echo(f"wrote {monitor.plot(plot)}")
