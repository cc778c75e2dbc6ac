"""Benchmark Lagoon's quantization schemes against fp32 in the same process.

    .venv/bin/python benchmarks/bench_quant.py [--quick] [--skip-model] [--torchao] [--threads N]

1. Linear level: y = x·Wᵀ with W 4096x4096 (2048 with --quick), decode M=1 and prefill M=256;
   fp32 and bf16 `F.linear` and every scheme's `QuantizedLinear`; int8 and w8a8 also at M=8 (the `_int_mm`
   floor band). Columns: best-of-reps ms, speedup vs fp32, relative error
   ‖y − y_fp32‖ / ‖y_fp32‖.
2. MoE block: `lagoon.moe.SparseMoE` (8 experts top-2, hidden 1024, intermediate 2816) decoding one
   token, fp32 experts vs quantized `QuantizedExperts`.
3. Model level (the embedded SmolLM2-135M, loaded as fp32): greedy decode tok/s through
   `lagoon.engine.Engine`, weight bytes, and over the shipped held-out text mean KL, top-1
   agreement and perplexity delta vs the fp32 model (all tokens dynamically scaled, as generated
   tokens are). Each scheme's defaults as `lagoon quantize` applies them (w8a8 / fp8 calibrated on
   the shipped calibration text with SmoothQuant) and the alternatives they replace; int4 + GPTQ
   rounds with Hessians from the calibration text. `--float-source` runs this section on an
   off-grid float model built from the embedded one (`off_grid`: its weights are a dequantized
   Q4_1 file, on which 32-group int4 is trivially exact).

`--torchao` adds torchao 0.18 rows (`Int8DynamicActivationInt8WeightConfig` and
`Int8WeightOnlyConfig`, `torch.compile`d; the bench extra installs it) to the linear table; each
compile takes 15-70 s on a 2-core CPU, so they are off by default. Timings on a shared 2-core
machine are noisy: read ratios, not absolute numbers, and rerun when in doubt. The full default
run took 10 min there (the model section ~7 of it): use `--skip-model` or `--quick` for a short one.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.quant import QuantConfig, get_scheme, quantize_
from lagoon.quant.linear import QuantizedLinear

SCHEMES = ("int8", "w8a8", "int4", "fp8")
DATA = Path(__file__).resolve().parents[1] / "src" / "lagoon" / "quant" / "data"
HELDOUT = DATA / "heldout.txt"
CALIBRATION = DATA / "calibration.txt"


def timeit(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * min(times)  # best of reps: the least disturbed by other processes


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(r) + " |")


@torch.no_grad()
def torchao_modules(lin: nn.Linear) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """torchao's int8 configs on a copy of `lin`, compiled; {} when torchao is not installed."""
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig
        from torchao.quantization import quantize_ as ao_quantize_
    except ImportError:
        print("torchao is not installed (pip install -e '.[bench]'): no torchao rows")
        return {}
    out = {}
    for name, cfg in (("torchao w8a8 compiled", Int8DynamicActivationInt8WeightConfig()),
                      ("torchao int8wo compiled", Int8WeightOnlyConfig())):
        m = nn.Sequential(copy.deepcopy(lin))
        ao_quantize_(m, cfg)
        out[name] = torch.compile(m)
    return out


def bench_linear(n: int, reps: int, with_torchao: bool = False) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(n, n, bias=False)
    mods: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "fp32 F.linear": lambda x: F.linear(x, lin.weight),
        "bf16 F.linear": (lambda wb: lambda x: F.linear(x.bfloat16(), wb))(lin.weight.bfloat16()),
    }
    for s in SCHEMES:  # each scheme's default group size (int8 g32, int4 g128), plus per-channel int8
        q = QuantizedLinear.from_float(lin, get_scheme(s))
        mods[f"{s}{f' g{q.scheme.group_size}' if q.scheme.GROUP_SIZES else ''}"] = q
    mods["int8 per-channel"] = QuantizedLinear.from_float(lin, get_scheme("int8", 0))
    if with_torchao:
        mods.update(torchao_modules(lin))
    rows = []
    for m in (1, 8, 256):
        x = torch.randn(m, n)
        ref = F.linear(x, lin.weight)
        base = timeit(lambda x=x: F.linear(x, lin.weight), reps)
        for name, f in mods.items():
            if m == 8 and name not in ("fp32 F.linear", "bf16 F.linear", "w8a8", "int8 per-channel"):
                continue
            if isinstance(f, QuantizedLinear):
                f.path_counts.clear()
            ms = timeit(lambda f=f, x=x: f(x), reps)
            kernel = f" [{f.path_counts.most_common(1)[0][0]}]" if isinstance(f, QuantizedLinear) else ""
            rows.append([f"{m}x{n}x{n}", name + kernel, f"{ms:.2f}", f"{base / ms:.2f}x", f"{rel(f(x), ref):.1e}"])
    table(f"Linear {n}x{n} (speedup vs fp32 in the same run)", ["M x K x N", "path", "ms", "speedup", "rel err"], rows)


@torch.no_grad()
def bench_moe(reps: int) -> None:
    from lagoon.moe import SparseMoE

    torch.manual_seed(0)
    h, i, e, k = 1024, 2816, 8, 2
    x = torch.randn(1, h)
    rows = []
    base_moe = SparseMoE(h, i, e, k).eval()
    with torch.no_grad():
        base_moe.router.weight.normal_(0, 0.05)
    ref = base_moe(x)
    base = timeit(lambda: base_moe(x), reps)
    rows.append(["fp32", f"{base:.2f}", "1.00x", "0"])
    for s in ("int8", "w8a8", "int4"):
        q = copy.deepcopy(base_moe)
        quantize_(q, QuantConfig(scheme=s))
        ms = timeit(lambda q=q: q(x), reps)
        rows.append([s, f"{ms:.2f}", f"{base / ms:.2f}x", f"{rel(q(x), ref):.1e}"])
    table("SparseMoE decode, 1 token (8 experts top-2, 1024/2816)", ["experts", "ms", "speedup", "rel err"], rows)


def model_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


@torch.no_grad()
def off_grid(model: nn.Module, seed: int = 0) -> None:
    """Make the embedded model a float source that is not on a 4-bit grid, in place.

    Its weights are a dequantized Q4_1 file: per block of 32, w = m + d·q with q in 0..15, so
    int4 with 32-groups holds them exactly and flatters itself. Adding d·U(−½, ½) per block gives a
    float model whose round-to-nearest Q4_1 quantization is (up to the block's min/max moving) the
    shipped file: a plausible float original, as far from any 4-bit grid as a real one."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.in_features % 32 == 0:
            wg = m.weight.view(m.out_features, -1, 32)
            d = (wg.amax(-1, keepdim=True) - wg.amin(-1, keepdim=True)) / 15
            wg += d * (torch.rand(wg.shape, generator=g) - 0.5)


@torch.no_grad()
def bench_model(new_tokens: int, max_text_tokens: int, float_source: bool = False) -> None:
    from lagoon.engine import Engine, embedded_gguf_path
    from lagoon.engine.checkpoint import load_checkpoint
    from lagoon.engine.tokenizer import load_tokenizer
    from lagoon.quant import calibrate
    from lagoon.quant.fidelity import text_fidelity

    path = embedded_gguf_path()
    ref = load_checkpoint(path, "float32")
    if float_source:
        off_grid(ref)
    tok = load_tokenizer(path)
    ids = torch.tensor(tok.encode(HELDOUT.read_text())[:max_text_tokens])
    prompt = tok.encode("def fibonacci(n):\n    ")
    rows = []
    cal_ids = torch.tensor(tok.encode(CALIBRATION.read_text()))
    cal = calibrate(ref, [cal_ids[i : i + 256].unsqueeze(0) for i in range(0, cal_ids.numel(), 256)], hessians=True)
    # (row, config, calibrated): each scheme's defaults as `lagoon quantize` applies them, plus the
    # alternatives they beat (per-channel int8, uncalibrated w8a8, int4 with 32-groups)
    variants: list[tuple[str, QuantConfig | None, bool]] = [
        ("fp32", None, False),
        ("bf16", QuantConfig(scheme="bf16"), False),
        ("int8 (default: g32)", QuantConfig(scheme="int8"), False),
        ("int8 per-channel", QuantConfig(scheme="int8", group_size=0), False),
        ("w8a8 (default: calibrated, SmoothQuant)", QuantConfig(scheme="w8a8"), True),
        ("w8a8 --no-calibration", QuantConfig(scheme="w8a8"), False),
        ("int4 (default: g128/64 by K)", QuantConfig(scheme="int4"), False),
        ("int4 g32", QuantConfig(scheme="int4", group_size=32), False),
        ("int4 + GPTQ", QuantConfig(scheme="int4"), True),
        ("int4 g32 + GPTQ", QuantConfig(scheme="int4", group_size=32), True),
        ("fp8 (default: calibrated)", QuantConfig(scheme="fp8"), True),
    ]
    ref_logits: dict[bytes, torch.Tensor] = {}

    def ref_fn(inp: torch.Tensor) -> torch.Tensor:  # the fp32 logits are computed once per window
        key = inp.numpy().tobytes()
        if key not in ref_logits:
            ref_logits[key] = ref(inp)
        return ref_logits[key]

    for name, qc, calibrated in variants:
        m = ref if qc is None else copy.deepcopy(ref)
        if qc is not None:
            quantize_(m, qc, calibration=cal if calibrated else None)
        eng = Engine(m, tok, name=name)
        params = eng.params(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        eng.complete(prompt, eng.params(max_new_tokens=2, temperature=0.0, ignore_eos=True))
        c = eng.complete(prompt, params)
        eng.close()
        tps = c.completion_tokens / max(c.duration_s - c.ttft_s, 1e-9)
        if qc is None:
            fid = "—", "—", "—"
        else:
            tf = text_fidelity(ref_fn, m, ids, window=256)
            fid = f"{tf.mean_kl:.4f}", f"{100 * tf.top1_agreement:.1f}%", f"{tf.ppl_delta_pct:+.2f}%"
        rows.append([name, f"{tps:.1f}", f"{model_bytes(m) / 1e6:.0f}", *fid])
        print(f"  {name}: done", flush=True)
    table(
        f"{'Off-grid float source from the embedded' if float_source else 'Embedded'} SmolLM2-135M (fp32 reference; {ids.numel()} held-out tokens; lm_head and embedding kept float)",
        ["weights", "decode tok/s", "MB", "mean KL", "top-1 agree", "ppl delta"],
        rows,
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="2048² linears, fewer reps, shorter texts")
    ap.add_argument("--skip-model", action="store_true", help="skip the embedded-model section")
    ap.add_argument("--float-source", action="store_true", help="model section on an off-grid float source (see off_grid)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    ap.add_argument("--torchao", action="store_true", help="add compiled torchao rows to the linear table (slow to compile)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_linear(2048 if a.quick else 4096, 5 if a.quick else 15, a.torchao)
    bench_moe(5 if a.quick else 15)
    if not a.skip_model:
        bench_model(8 if a.quick else 24, 256 if a.quick else 768, a.float_source)


if __name__ == "__main__":
    main()
