"""Decode of the compiled embedded SmolLM2-135M with Lagoon's ops called from the AOTInductor package
as C shims (`lagoon.engine.aoti_step.SHIMS`, ``csrc/aoti_shims.cpp``) against the same package calling
them through AOTInductor's proxy executor (the package compiled with ``SHIMS`` emptied): two engines
in one process, runs alternating proxy / shim so a noisy machine disturbs both alike. Prints the
median decode tok/s of each and shim / proxy, with the CPU flags it ran with; then single decode
steps (position 128, alternating batches of 25): the fastest and the 10th-percentile step of each.

    HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src .venv/bin/python benchmarks/bench_aoti_shims.py \\
        [--threads 2] [--rounds 5] [--tokens 64] [--step-rounds 12]

Both packages are compiled afresh (minutes on 2 cores): the proxy one first, its entries deleted after
loading (both share a cache key), then the shim one, which stays in the cache.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from decode_timing import cpu_line, decode_rate, prefill, step_times  # benchmarks/: this script's folder

from lagoon.config import EngineSection
from lagoon.engine import aoti_step, compute, cpu_kernels, load_model

TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n" * 20
MODES = ("proxy", "shim")


def _load(mode: str, threads: int):
    saved = dict(aoti_step.SHIMS)
    if mode == "proxy":
        aoti_step.SHIMS.clear()
    try:
        engine = load_model("embedded", precision="native", config=EngineSection(
            max_batch_size=8, max_seq_len=4096, prefix_cache=False, compile=True, threads=threads))
        step = engine.step
        if step.loaded_buckets:  # a cached graph of either kind: this engine compiles its own
            for b in (1, 2):
                step.entry(b, "aoti").unlink(missing_ok=True)
            step._fns.clear()
            step.compiled_buckets.clear()
            step.loaded_buckets.clear()
            compute.call(step.warm_up)
        assert step.backend == "aoti" and step.compiled_buckets == {1}, step.eager_reason
        if mode == "proxy":
            for b in (1, 2):
                step.entry(b, "aoti").unlink(missing_ok=True)  # the shim engine compiles the cached one
        return engine
    finally:
        aoti_step.SHIMS.update(saved)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--step-rounds", type=int, default=12, help="batches of 25 single steps per engine")
    a = ap.parse_args()
    print(cpu_line(a.threads))
    if not cpu_kernels.available():
        sys.exit(f"Lagoon's kernels are unavailable ({cpu_kernels.unavailable_reason()}): nothing to compare")
    engines = {m: _load(m, a.threads) for m in MODES}
    ids = engines["shim"].encode(TEXT)[:128]
    for m in MODES:
        decode_rate(engines[m], ids[:16], 4)
    got: dict[str, list[float]] = {m: [] for m in MODES}
    for r in range(a.rounds):
        for m in (MODES if r % 2 == 0 else MODES[::-1]):
            got[m].append(decode_rate(engines[m], ids, a.tokens))
        print(f"round {r + 1}: " + ", ".join(f"{m} {got[m][-1]:.1f}" for m in MODES), flush=True)
    med = {m: statistics.median(v) for m, v in got.items()}
    print("median decode tok/s (128-token prompt, greedy, batch 1): "
          + ", ".join(f"{m} {med[m]:.1f}" for m in MODES) + f"; shim / proxy {med['shim'] / med['proxy']:.3f}x")

    steps: dict[str, list[float]] = {m: [] for m in MODES}
    for m in MODES:
        compute.call(prefill, engines[m], 0, ids)
    for r in range(a.step_rounds):
        for m in (MODES if r % 2 == 0 else MODES[::-1]):
            steps[m] += compute.call(step_times, engines[m], 0, len(ids), 25)
    low = {m: (min(v) * 1e3, sorted(v)[len(v) // 10] * 1e3, statistics.median(v) * 1e3) for m, v in steps.items()}
    print("single decode steps, ms (fastest / 10th percentile / median): " + ", ".join(
        f"{m} {lo:.3f} / {p10:.3f} / {p50:.3f}" for m, (lo, p10, p50) in low.items()))
    print(f"proxy / shim step time: fastest {low['proxy'][0] / low['shim'][0]:.3f}x, "
          f"10th percentile {low['proxy'][1] / low['shim'][1]:.3f}x, median {low['proxy'][2] / low['shim'][2]:.3f}x")


if __name__ == "__main__":
    main()
