"""The whole compiled decode step of the embedded SmolLM2-135M with its decode attention on Lagoon's
kernel (`lagoon::decode_attention`, `kv_cache.use_native_attention`) against SDPA over the gathered
blocks, at a few attended lengths: two engines in one process (``LAGOON_NATIVE_ATTENTION`` 0 / 1 at
load), each with one sequence prefilled to S - 1 tokens, then timed steps at position S - 1
alternating between the engines (a noisy machine disturbs both alike). Prints per length the best
CPU ms a step (the compute thread's own time) and the median of the paired ratios SDPA / kernel,
of CPU and of wall time.

    HF_HUB_OFFLINE=1 PYTHONPATH=$PWD/src .venv/bin/python benchmarks/bench_decode_attention.py \\
        [--threads 1] [--lengths 200 1500] [--rounds 10]

A first run compiles each engine's step (minutes; cached under ~/.cache/lagoon/compile).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
from decode_timing import cpu_line, prefill  # benchmarks/: this script's folder

from lagoon.config import EngineSection
from lagoon.engine import compute, load_model

TEXT = "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1)\n" * 200


def _load(native: bool, threads: int):
    os.environ["LAGOON_NATIVE_ATTENTION"] = "1" if native else "0"
    return load_model("embedded", precision="native", config=EngineSection(
        max_batch_size=8, max_seq_len=4096, prefix_cache=False, compile=True, threads=threads))


def _steps(engine, sid: int, token: int, at: int, n: int) -> tuple[float, float]:
    tok, pos = torch.tensor([[token]]), torch.tensor([[at]])
    c0, w0 = time.thread_time(), time.perf_counter()
    for _ in range(n):  # rewrites position `at`: every step attends over the same S keys
        engine.step([sid], tok, pos)
    return (time.thread_time() - c0) / n * 1e3, (time.perf_counter() - w0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--lengths", type=int, nargs="+", default=[200, 1500])
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    print(cpu_line(a.threads))
    engines = {"sdpa": _load(False, a.threads), "kernel": _load(True, a.threads)}
    ids = engines["sdpa"].encode(TEXT)
    for S in a.lengths:
        sid, prompt = 1000 + S, ids[: S - 1]
        for e in engines.values():
            compute.call(prefill, e, sid, prompt)
            compute.call(_steps, e, sid, ids[S - 1], S - 1, 5)  # warm
        cpu: dict[str, list[float]] = {k: [] for k in engines}
        wall: dict[str, list[float]] = {k: [] for k in engines}
        for _ in range(a.rounds):
            for k, e in engines.items():
                c, w = compute.call(_steps, e, sid, ids[S - 1], S - 1, 20)
                cpu[k].append(c)
                wall[k].append(w)
        ratio = {m: statistics.median(s / k for s, k in zip(d["sdpa"], d["kernel"], strict=True)) for m, d in (("cpu", cpu), ("wall", wall))}
        print(f"S = {S}: best CPU ms a step: SDPA {min(cpu['sdpa']):.2f}, kernel {min(cpu['kernel']):.2f}; "
              f"median paired ratio SDPA / kernel: CPU {ratio['cpu']:.3f}, wall {ratio['wall']:.3f}; "
              f"load {os.getloadavg()[0]:.1f}", flush=True)


if __name__ == "__main__":
    main()
