"""`lagoon quantize` (write a quantized checkpoint) and `lagoon quant fidelity` (what it cost).

Thin: parse, merge config, load through `lagoon.engine.checkpoint`, call `lagoon.quant`.
The scheme comes from `--scheme` or else from `model_deployment.quantization.profile`.
Activation-quantized schemes (w8a8, fp8) calibrate by default on the shipped calibration text
(`lagoon.quant.calibrate.CALIBRATION_TEXT`: static ranges + SmoothQuant), and int4 does for GPTQ; `--no-calibration` opts
out and the run says it is uncalibrated (so does `quant.json` and `lagoon quant fidelity`).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Annotated, Any

import typer

from lagoon.cli.common import ConfigOpt, exits_cleanly, load

app = typer.Typer(help="Quantization: fidelity reports for quantized checkpoints.", no_args_is_help=True)

HELDOUT = Path(__file__).resolve().parents[1] / "quant" / "data" / "heldout.txt"
CALIBRATION = Path(__file__).resolve().parents[1] / "quant" / "data" / "calibration.txt"
TRANSCRIPT = Path(__file__).resolve().parents[1] / "quant" / "data" / "transcript.json"
UNCALIBRATED = (
    "UNCALIBRATED: every activation is scaled dynamically per token and no SmoothQuant is applied "
    "(lower fidelity; drop --no-calibration to calibrate on the shipped text, or pass --calibration FILE)"
)


def _source_path(source: str) -> Path:
    from lagoon.engine.engine import resolve_model
    from lagoon.errors import CheckpointError

    p = resolve_model(source)
    if not p.exists():
        raise CheckpointError(f"model {source!r} not found: give a HF folder, a .gguf file, `embedded` or `embedded-moe`")
    return p


def _windows(ids: list[int], window: int, max_tokens: int | None) -> list[Any]:
    import torch

    t = torch.tensor(ids[: max_tokens or None], dtype=torch.long)
    return [t[i : i + window].unsqueeze(0) for i in range(0, t.numel(), window) if t[i : i + window].numel() > 1]


def _read_text(path: Path) -> str:
    from lagoon.errors import QuantizationError

    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise QuantizationError(f"cannot read text file {path}: {exc.strerror}; give an existing UTF-8 file") from exc


def _without_grad(fn: Any) -> Any:
    """Run a command under torch.no_grad() without changing the caller's grad mode."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    return wrapper


@exits_cleanly
@_without_grad
def quantize(
    model: Annotated[str, typer.Option("--model", help="Float checkpoint: HF folder, .gguf file or `embedded`.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to write (model.safetensors + quant.json).")],
    scheme: Annotated[str | None, typer.Option("--scheme", help="int8, w8a8, int4, fp8 or bf16 (default: the config's profile).")] = None,
    calibration: Annotated[Path | None, typer.Option(
        "--calibration", help="Text file for static activation ranges and SmoothQuant (w8a8/fp8 default: the shipped calibration text)."
    )] = None,
    no_calibration: Annotated[bool, typer.Option(
        "--no-calibration", help="Skip calibration (w8a8/fp8: all activations dynamic, no SmoothQuant; int4: no GPTQ). Lower fidelity."
    )] = False,
    group_size: Annotated[int | None, typer.Option(
        "--group-size", help="Largest group size tried per layer (int4: 32/64/128, default 32; int8: 0 = per channel, 32/64/128, default 32)."
    )] = None,
    include_lm_head: Annotated[bool, typer.Option("--include-lm-head", help="Quantize lm_head too.")] = False,
    include_embeddings: Annotated[bool, typer.Option("--include-embeddings", help="Quantize the embedding (int8 rows).")] = False,
    max_calibration_tokens: Annotated[int, typer.Option(help="Cap on calibration tokens.")] = 4096,
    smooth_alpha: Annotated[float, typer.Option("--smooth-alpha", help="SmoothQuant strength for calibrated w8a8/fp8 (0 = off).")] = 0.5,
    keep: Annotated[list[str] | None, typer.Option("--keep", help="Regex of module names to leave in float (repeatable).")] = None,
    config: ConfigOpt = None,
) -> None:
    """Quantize a float checkpoint and write a loadable quantized one."""

    from lagoon.engine.checkpoint import load_checkpoint
    from lagoon.engine.tokenizer import load_tokenizer
    from lagoon.errors import QuantizationError
    from lagoon.quant import QuantConfig, calibrate, quantize_, save_quantized
    from lagoon.quant.quantize import scheme_class

    if calibration is not None and no_calibration:
        raise QuantizationError("--calibration and --no-calibration contradict each other; give one of them")
    cfg = load(config)
    qc = QuantConfig.from_section(
        cfg.model_deployment.quantization,
        scheme=scheme,
        group_size=group_size,
        include_lm_head=include_lm_head,
        include_embeddings=include_embeddings,
        smooth_alpha=smooth_alpha,
        keep=tuple(keep or ()),
    )
    if qc is None:
        raise QuantizationError("profile FP16 means no quantization; pass --scheme or set model_deployment.quantization.profile")
    path = _source_path(model)
    net = load_checkpoint(path, "float32")
    activation_quantized = scheme_class(qc.scheme).activation_quantized
    gptq = qc.scheme == "int4" and qc.gptq
    if calibration is None and (activation_quantized or gptq) and not no_calibration:
        calibration = CALIBRATION
    cal = None
    if calibration is not None:
        tok = load_tokenizer(path)
        cal = calibrate(net, _windows(tok.encode(_read_text(calibration)), 256, max_calibration_tokens), hessians=gptq)
    report = quantize_(net, qc, calibration=cal)
    extra = {"calibration": str(calibration) if calibration else None, "calibrated": report.calibrated}
    save_quantized(net, out, source=model, extra=extra)
    typer.echo(f"{qc.scheme}: quantized {len(report.swapped)} modules, kept {len(report.kept)} ({', '.join(sorted(set(report.kept.values())))})")
    if activation_quantized:
        typer.echo(f"calibrated on {calibration}" if report.calibrated else UNCALIBRATED)
    if qc.scheme == "int4":
        typer.echo(
            f"GPTQ-rounded {len(report.gptq)} Linears (Hessians from {calibration})" if report.gptq
            else "round-to-nearest int4 (no calibration: drop --no-calibration for GPTQ)"
        )
    if cal is not None:
        starved = {n: s["starved"] for n, s in cal.summary(qc.min_expert_tokens)["experts"].items() if s["starved"]}
        if qc.expert_calibration and starved:
            typer.echo(f"starved experts (dynamic scales): {json.dumps(starved)}")
    typer.echo(f"wrote {out}")


@app.command()
@exits_cleanly
@_without_grad
def fidelity(
    model: Annotated[str, typer.Option("--model", help="The float checkpoint the quantized one came from.")],
    quantized: Annotated[Path, typer.Option("--quantized", help="Folder written by `lagoon quantize`.")],
    text: Annotated[Path, typer.Option("--text", help="Held-out text to score.")] = HELDOUT,
    window: Annotated[int, typer.Option(help="Tokens per scored window.")] = 256,
    max_tokens: Annotated[int, typer.Option(help="Cap on scored tokens.")] = 1024,
    transcript: Annotated[Path, typer.Option(
        "--transcript", help="Agent transcript (JSON messages) for fidelity per token type (default: the shipped one)."
    )] = TRANSCRIPT,
    against_gguf: Annotated[Path | None, typer.Option(
        "--against-gguf", help="Also score this GGUF as llama.cpp runs it (needs llama-cpp-python), same text and ids."
    )] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Per-layer SQNR (per expert for MoE, worst named) and KL / top-1 / perplexity over a text."""
    import torch

    from lagoon.engine.checkpoint import load_checkpoint
    from lagoon.engine.tokenizer import load_tokenizer
    from lagoon.quant import load_quantized, read_metadata
    from lagoon.quant.fidelity import FidelityReport, layer_fidelity, text_fidelity, token_type_report
    from lagoon.quant.quantize import scheme_class

    load(config)
    meta = read_metadata(quantized)
    path = _source_path(model)
    ref = load_checkpoint(path, "float32")
    gguf_fn = None
    if against_gguf is not None:  # before the long part: a missing llama_cpp fails fast
        from lagoon.quant.llama_cpp_ref import llama_cpp_logits

        gguf_fn = llama_cpp_logits(against_gguf, n_ctx=window, vocab_size=ref.lm_head.out_features)
    q = load_quantized(load_checkpoint(path, "float32"), quantized)
    ids = load_tokenizer(path).encode(_read_text(text))
    wins = _windows(ids, window, max_tokens)
    t_ids, t_types = _transcript_tokens(load_tokenizer(path), transcript, max_tokens)
    # weight-only schemes: the activation policy changes nothing, so one pass suffices
    policies = ("all-dynamic", "all-static", "policy") if scheme_class(meta["scheme"]).activation_quantized else ("policy",)
    report = FidelityReport(
        layers=layer_fidelity(ref, q, wins[:1]),
        text=text_fidelity(ref_fn := _cached(ref), q, torch.cat([w[0] for w in wins]), window=window),
        token_types=token_type_report(ref, q, t_ids, t_types, policies),
        meta={
            "scheme": meta["scheme"], "model": model, "quantized": str(quantized), "text": str(text),
            "calibration": meta.get("calibration"), "transcript": str(transcript),
        },
    )
    if gguf_fn is not None:
        report.against_gguf = text_fidelity(ref_fn, gguf_fn, torch.cat([w[0] for w in wins]), window=window)
        report.meta["gguf"] = str(against_gguf)
    if as_json:
        typer.echo(json.dumps(report.to_dict(), indent=2))
        return
    _print(report)


def _cached(model: Any) -> Any:
    """The float logits per window, computed once (both the Lagoon and the llama.cpp rows use them)."""
    memo: dict[bytes, Any] = {}

    def fn(ids: Any) -> Any:
        key = ids.numpy().tobytes()
        if key not in memo:
            memo[key] = model(ids)
        return memo[key]

    return fn


def _transcript_tokens(tok: Any, path: Path, max_tokens: int) -> tuple[Any, Any]:
    """A transcript file -> (ids [T], token types [T]) through the model's chat template."""
    import torch

    from lagoon.engine.tokenizer import ChatFormat
    from lagoon.errors import QuantizationError
    from lagoon.quant.policy import types_for_roles

    try:
        messages = json.loads(_read_text(path))["messages"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise QuantizationError(
            f"{path} is not a transcript: expected JSON with a 'messages' list of {{role, content}} ({exc})"
        ) from None
    ids, roles = ChatFormat(tok).encode_with_roles(messages)
    types = types_for_roles(roles)
    return torch.tensor(ids[:max_tokens]), torch.tensor(types[:max_tokens])


def _print(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    t = report.text
    c = Console()
    from lagoon.quant.quantize import scheme_class

    cal = report.meta.get("calibration")
    note = f" (calibrated on {cal})" if cal else " (UNCALIBRATED)" if scheme_class(report.meta["scheme"]).activation_quantized else ""
    c.print(
        f"scheme {report.meta['scheme']}{note}: {t.tokens} tokens, mean KL {t.mean_kl:.5f}, top-1 agreement "
        f"{100 * t.top1_agreement:.1f}%, ppl {t.ppl_float:.3f} -> {t.ppl_quant:.3f} ({t.ppl_delta_pct:+.2f}%)"
    )
    table = Table("layer", "SQNR dB", "tokens", "worst expert")
    for lf in sorted(report.layers, key=lambda x: x.sqnr_db)[:15]:
        worst = "" if lf.worst_expert is None else f"{lf.worst_expert} ({lf.expert_sqnr_db[lf.worst_expert]:.1f} dB)"
        table.add_row(lf.name, f"{lf.sqnr_db:.1f}", str(lf.tokens), worst)
    c.print(table)
    if report.against_gguf is not None:
        g = report.against_gguf
        c.print(
            f"llama.cpp {report.meta['gguf']}: {g.tokens} tokens, mean KL {g.mean_kl:.5f}, top-1 agreement "
            f"{100 * g.top1_agreement:.1f}%, ppl {g.ppl_float:.3f} -> {g.ppl_quant:.3f} ({g.ppl_delta_pct:+.2f}%)"
        )
    c.print(f"({len(report.layers)} layers; the 15 worst shown; --json for all)")
    tt = Table("policy", "dynamic rows", *(f"{f.token_type.lower()} top-1 / KL" for f in report.token_types[0].per_type),
               title=f"per token type on {report.meta['transcript']}")
    for pf in report.token_types:
        dyn = "weight-only" if pf.dynamic_fraction != pf.dynamic_fraction else f"{100 * pf.dynamic_fraction:.0f}%"
        tt.add_row(pf.policy, dyn, *(f"{100 * f.top1_agreement:.1f}% / {f.mean_kl:.4f} ({f.tokens})" for f in pf.per_type))
    c.print(tt)
