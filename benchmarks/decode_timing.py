"""Timing pieces the decode benchmarks share (bench_aoti_shims, bench_contention, bench_decode_attention):
the CPU line they print, a decode rate from `Engine.complete`, an eager prefill into an engine's cache,
and single decode steps over the same keys. Run them on the engine's compute thread
(`lagoon.engine.compute.call`) where they touch the model."""

from __future__ import annotations

import os
import time

import torch

FLAGS = ("avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "avx2", "fma")


def cpu_line(threads: int) -> str:
    cpu = open("/proc/cpuinfo").read().split()
    flags = " ".join(f for f in FLAGS if f in cpu)
    return f"torch {torch.__version__}, {os.cpu_count()} CPUs, flags: {flags}, engine.threads {threads}"


def decode_rate(engine, ids: list[int], tokens: int) -> float:
    """Decode tok/s of one greedy completion, its first token (the prefill) left out."""
    c = engine.complete(ids, engine.params(max_new_tokens=tokens, ignore_eos=True))
    return (c.completion_tokens - 1) / (c.duration_s - c.ttft_s)


def prefill(engine, sid: int, ids: list[int]) -> None:
    cache = engine.cache
    cache.allocate(sid, ids)
    cache.ensure(sid, len(ids) + 1)
    pos = torch.arange(len(ids))[None]
    cache.prepare([sid], pos)
    with torch.no_grad():
        engine.model(torch.tensor([ids]), pos, cache)


def step_times(engine, sid: int, at: int, n: int, token: int = 17) -> list[float]:
    """Wall seconds of `n` single decode steps; each rewrites position `at`, so every step attends over
    the same keys."""
    tok, pos, out = torch.tensor([[token]]), torch.tensor([[at]]), []
    for _ in range(n):
        t = time.perf_counter()
        engine.step([sid], tok, pos)
        out.append(time.perf_counter() - t)
    return out
