"""Decode of the compiled embedded SmolLM2-135M with the machine to itself and beside one busy
single-threaded process, on Lagoon's kernel pool (its kernels on `csrc/pool.cpp`, the compiled
step's own loops single-threaded) against torch's OpenMP pool (``LAGOON_KERNEL_POOL=0``: kernels on
`at::parallel_for`, inductor's loops OpenMP-parallel): two engines in one process, each compiled for
its setting (`cpu_kernels.kernel_pool` switched before each run), runs alternating pool / OpenMP so
a noisy machine disturbs both alike. Prints the median decode tok/s of each, the busy / quiet ratio
of each, and pool / OpenMP in both settings, with the CPU flags it ran with. Then single decode
steps (position 128, alternating batches of 25 between the engines, no busy process): the fastest
and the 10th-percentile step of each, the least disturbed ones, which compare the two even when
other jobs share the machine (a median there mostly measures the others' load).

    HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src .venv/bin/python benchmarks/bench_contention.py \\
        [--threads 2] [--rounds 3] [--tokens 64] [--busy-tokens 24] [--step-rounds 12]

The busy process is ``python -c "while True: pass"``, started for the busy runs and stopped after.
A first run compiles each engine's step (minutes; cached under ~/.cache/lagoon/compile). OpenMP
beside a busy process can take a minute a run (1-3 tok/s on 2 cores): --busy-tokens keeps it short.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from decode_timing import cpu_line, decode_rate, prefill, step_times  # benchmarks/: this script's folder

from lagoon.config import EngineSection
from lagoon.engine import compute, cpu_kernels, load_model

TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n" * 20
MODES = ("pool", "openmp")


def _load(mode: str, threads: int):
    cpu_kernels.kernel_pool(mode == "pool")  # the compile key and the step's loops follow it
    return load_model("embedded", precision="native", config=EngineSection(
        max_batch_size=8, max_seq_len=4096, prefix_cache=False, compile=True, threads=threads))


def _decode(engine, mode: str, ids: list[int], tokens: int) -> float:
    cpu_kernels.kernel_pool(mode == "pool")
    return decode_rate(engine, ids, tokens)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens a quiet run")
    ap.add_argument("--busy-tokens", type=int, default=24, help="new tokens a run beside the busy process")
    ap.add_argument("--step-rounds", type=int, default=12, help="batches of 25 single steps per engine")
    a = ap.parse_args()
    print(cpu_line(a.threads))
    if not cpu_kernels.available():
        sys.exit(f"Lagoon's kernels are unavailable ({cpu_kernels.unavailable_reason()}): nothing to compare")
    engines = {m: _load(m, a.threads) for m in MODES}
    ids = engines["pool"].encode(TEXT)[:128]
    for m in MODES:  # warm: the first step of each graph
        _decode(engines[m], m, ids[:16], 4)
    got: dict[tuple[str, str], list[float]] = {(m, s): [] for m in MODES for s in ("quiet", "busy")}
    for r in range(a.rounds):
        for m in MODES:
            got[m, "quiet"].append(_decode(engines[m], m, ids, a.tokens))
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            for m in (MODES if r % 2 == 0 else MODES[::-1]):
                got[m, "busy"].append(_decode(engines[m], m, ids, a.busy_tokens))
        finally:
            busy.kill()
            busy.wait()
        print(f"round {r + 1}: " + ", ".join(f"{m} {s} {got[m, s][-1]:.1f}" for m in MODES for s in ("quiet", "busy")),
              flush=True)
    med = {k: statistics.median(v) for k, v in got.items()}
    print("\nmedian decode tok/s (128-token prompt, greedy, batch 1):")
    print(f"{'':8} {'quiet':>8} {'busy':>8} {'busy/quiet':>11}")
    for m in MODES:
        print(f"{m:8} {med[m, 'quiet']:8.1f} {med[m, 'busy']:8.1f} {med[m, 'busy'] / med[m, 'quiet']:11.2f}")
    print(f"pool / openmp: quiet {med['pool', 'quiet'] / med['openmp', 'quiet']:.2f}x, "
          f"busy {med['pool', 'busy'] / med['openmp', 'busy']:.2f}x")

    steps: dict[str, list[float]] = {m: [] for m in MODES}
    for m in MODES:
        compute.call(prefill, engines[m], 0, ids)
    for _ in range(a.step_rounds):
        for m in MODES:
            cpu_kernels.kernel_pool(m == "pool")
            steps[m] += compute.call(step_times, engines[m], 0, len(ids), 25)
    low = {m: (min(v) * 1e3, sorted(v)[len(v) // 10] * 1e3) for m, v in steps.items()}
    print("\nsingle decode steps, ms (fastest, 10th percentile): " + ", ".join(
        f"{m} {lo:.2f} / {p10:.2f}" for m, (lo, p10) in low.items()))
    print(f"openmp / pool step time: fastest {low['openmp'][0] / low['pool'][0]:.2f}x, "
          f"10th percentile {low['openmp'][1] / low['pool'][1]:.2f}x")


if __name__ == "__main__":
    main()
