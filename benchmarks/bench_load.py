"""Load time of the embedded SmolLM2-135M GGUF (`load_model('embedded', precision='native')`, compile
off), each row in a fresh process: the GGUF parsed and repacked with the repack cache off (every
load before `lagoon.engine.repack_cache`), a cold cache (parse, repack, write the entry) and a warm
one (the entry memory-mapped). Per row, medians of `--repeats` processes: process s (interpreter
start to a ready engine), load_model s, of which checkpoint s and tokenizer s, and first token s (one
8-token completion right after: the mapped pages are touched there). Prints the CPU features.

    .venv/bin/python benchmarks/bench_load.py [--repeats 3] [--threads N]

Measured (2026-11-29, 2-core AVX-512 VM shared with other jobs, load average ~4.5, --threads 1),
medians of 3: no repack cache: process 5.8 s, load_model 4.3, checkpoint 2.7, tokenizer 1.2; warm
cache: process 4.5 s, load_model 3.0, checkpoint 1.3 (0.10-0.17 s when torch._dynamo is already
imported: building the model on the meta device imports it), tokenizer 1.2. Main before the repack
cache and the quick GGUF header reader, same run: process 8.6 s, load_model 6.9, checkpoint 5.4.

The tokenizer cache is filled once before timing (its first conversion takes ~20 s and is not what
this measures); the repack cache lives in a temporary `LAGOON_CACHE_DIR` that this run removes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import time; t0 = time.perf_counter()
import torch; torch.set_num_threads({threads})
import lagoon.engine.engine as E
from lagoon.config import EngineSection
spent = {{}}
def timed(name, fn):
    def run(*a, **k):
        t = time.perf_counter(); out = fn(*a, **k); spent[name] = time.perf_counter() - t; return out
    return run
E.load_checkpoint = timed("checkpoint", E.load_checkpoint)
E.load_tokenizer = timed("tokenizer", E.load_tokenizer)
t = time.perf_counter()
e = E.load_model("embedded", precision="native", config=EngineSection(compile=False))
load = time.perf_counter() - t
ready = time.perf_counter() - t0
t = time.perf_counter()
e.complete("def add(a, b):", e.params(max_new_tokens=8, ignore_eos=True))
first = time.perf_counter() - t
print("ROW", ready, load, spent["checkpoint"], spent["tokenizer"], first)
e.close()
"""


def run_child(env: dict[str, str], threads: int) -> list[float]:
    r = subprocess.run([sys.executable, "-c", CHILD.format(threads=threads)], capture_output=True, text=True,
                       env=env, timeout=900)
    line = next((x for x in r.stdout.splitlines() if x.startswith("ROW")), None)
    if line is None:
        raise RuntimeError(f"the load failed: {r.stderr[-2000:]}")
    return [float(x) for x in line.split()[1:]]


def cpu_features() -> str:
    import torch

    from lagoon.engine.kernels import kernel_plan

    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(next(x for x in f if x.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return (f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
            f"{os.cpu_count()} cpus, flags: {' '.join(x for x in wanted if x in flags)}; plan: {kernel_plan().describe()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    a = ap.parse_args()
    print(cpu_features(), f"| threads {a.threads}")
    root = tempfile.mkdtemp(prefix="lagoon-bench-load-")
    try:
        from lagoon.cache_dir import cache_root

        user_tokenizers = cache_root() / "tokenizers"
        if user_tokenizers.is_dir():  # reuse converted tokenizers: their ~20 s conversion is not measured here
            shutil.copytree(user_tokenizers, os.path.join(root, "tokenizers"))
        base = {**os.environ, "LAGOON_CACHE_DIR": root, "LAGOON_CACHE": root, "LAGOON_COMPILE": "0",
                "HF_HUB_OFFLINE": "1"}
        run_child({**base, "LAGOON_REPACK_CACHE": "0"}, a.threads)  # fills the tokenizer cache if needed
        rows: dict[str, list[list[float]]] = {"no repack cache": [], "cold repack cache": [], "warm repack cache": []}
        for _ in range(a.repeats):
            rows["no repack cache"].append(run_child({**base, "LAGOON_REPACK_CACHE": "0"}, a.threads))
            shutil.rmtree(os.path.join(root, "gguf"), ignore_errors=True)
            rows["cold repack cache"].append(run_child(base, a.threads))
            rows["warm repack cache"].append(run_child(base, a.threads))
        size = sum(f.stat().st_size for f in (Path(root) / "gguf").iterdir())
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"{'':20} {'process s':>10} {'load_model s':>13} {'checkpoint s':>13} {'tokenizer s':>12} {'first token s':>14}")
    for name, runs in rows.items():
        med = [statistics.median(col) for col in zip(*runs, strict=True)]
        print(f"{name:20} " + " ".join(f"{v:>{w}.3f}" for v, w in zip(med, (10, 13, 13, 12, 14), strict=True)))
    base_ckpt = statistics.median(r[2] for r in rows["no repack cache"])
    warm_ckpt = statistics.median(r[2] for r in rows["warm repack cache"])
    print(f"checkpoint load, warm cache vs none: {base_ckpt / warm_ckpt:.1f}x faster; cache entry {size / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
