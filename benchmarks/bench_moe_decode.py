"""MoE decode speed: the compiled decode step (static-shape MoE path) against the eager engine.

    .venv/bin/python benchmarks/bench_moe_decode.py [--model embedded-moe] [--top-k 2] [--tokens 64] [--threads 2]

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


def build(compile: bool, args: argparse.Namespace):
    from lagoon.config import load_config
    from lagoon.engine import engine_from_config

    over = [f"engine.model={args.model}", f"engine.precision={args.precision}", f"engine.compile={str(compile).lower()}",
            f"engine.threads={args.threads}", "engine.max_batch_size=4"]
    if args.top_k:
        over.append(f"model_deployment.expert_routing.active_per_token={args.top_k}")
    t0 = time.perf_counter()
    eng = engine_from_config(load_config(*over))
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
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    print(f"# {cpu_features()}", flush=True)
    print(f"# model {args.model}, precision {args.precision}, top-k {args.top_k or 'checkpoint'}, "
          f"{args.tokens} new tokens, median of {args.repeats}", flush=True)
    engines = {name: build(c, args) for name, c in (("eager", False), ("compiled", True))}
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
                      "compiled": eng.step.compiled, "eager_reason": eng.step.eager_reason}
        eng.close()
    print(f"{'engine':<10} {'start s':>8} {'prefill tok/s':>14} {'decode tok/s':>13} {'best decode':>12}  compiled")
    for name, r in rows.items():
        print(f"{name:<10} {r['start_s']:>8.1f} {r['prefill']:>14.1f} {r['decode']:>13.1f} {r['best']:>12.1f}  {r['compiled']}"
              + (f" ({r['eager_reason']})" if r["eager_reason"] and name == "compiled" else ""))
    e, c = rows["eager"], rows["compiled"]
    same = sum(a == b for a, b in zip(e["ids"], c["ids"], strict=False))
    print(f"decode compiled/eager: median {c['decode'] / e['decode']:.2f}x, best {c['best'] / e['best']:.2f}x; greedy tokens equal: {same}/{len(e['ids'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
