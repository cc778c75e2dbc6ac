"""Warm start of the embedded SmolLM2-135M GGUF with the decode step compiled, by phase: what
`benchmarks/bench_engine.py`'s warm start (`start_s`) measures — a fresh process importing
`lagoon.engine` and running `load_model('embedded', precision='native', config=EngineSection(compile=True,
max_batch_size=8, threads=N))`, decode-step warm-up included, with the caches filled (the saved step,
the repack cache, the tokenizer record) — split into: import torch, import lagoon.engine, checkpoint,
tokenizer, KV cache, the step's load and its first call. Also the process's CPU seconds (steadier
than wall time on a shared machine), whether transformers / torch._dynamo / torch._inductor got
imported, and the step's backend (`LAGOON_COMPILE_BACKEND=dynamo` in the environment times dynamo's
saved artefact instead of the AOTInductor package).

    .venv/bin/python benchmarks/bench_start.py [--repeats 5] [--threads 2] [--src PATH ...]

Each `--src` is a `src` folder put first on PYTHONPATH (default: this checkout's), e.g. a worktree
of an older commit for a before/after; several are run interleaved (A, B, A, B ...), each with its
own temporary LAGOON_CACHE_DIR (or `--cache DIR`/srcN, kept), filled by one untimed start (which
may compile: minutes). Prints medians per source and the CPU features.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = """
import time; t0 = time.perf_counter()
import json, sys
import torch
t_torch = time.perf_counter()
import lagoon.engine as L
from lagoon.config import EngineSection
import lagoon.engine.engine as E
t_lagoon = time.perf_counter()
spent = {{}}
def timed(name, fn):
    def run(*a, **k):
        t = time.perf_counter(); out = fn(*a, **k); spent[name] = time.perf_counter() - t; return out
    return run
E.load_checkpoint = timed("checkpoint", E.load_checkpoint)
E.load_tokenizer = timed("tokenizer", E.load_tokenizer)
E.make_cache = timed("kv_cache", E.make_cache)
e = L.load_model("embedded", precision="native", config=EngineSection(compile=True, max_batch_size=8, threads={threads}))
total = time.perf_counter() - t0
load = e.step.ready_s.get(1, 0.0)
print("ROW", json.dumps({{"start": total, "cpu": time.process_time(), "import torch": t_torch - t0,
      "import lagoon.engine": t_lagoon - t_torch, **spent, "step load": load, "first call": e.step.warm_up_s - load,
      "compiled": e.step.compiled, "loaded": 1 in e.step.loaded_buckets, "backend": e.step.backend,
      "transformers": "transformers" in sys.modules, "dynamo": "torch._dynamo" in sys.modules,
      "inductor": "torch._inductor" in sys.modules}}))
e.close()
"""


def run_child(src: Path, cache: str, threads: int) -> dict:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "LAGOON_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", CHILD.format(threads=threads)], capture_output=True, text=True,
                       env=env, timeout=1800)
    line = next((x for x in r.stdout.splitlines() if x.startswith("ROW")), None)
    if line is None:
        raise RuntimeError(f"the start with {src} failed: {r.stderr[-2000:]}")
    return json.loads(line[4:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--src", type=Path, action="append", help="a src folder to time (repeatable)")
    ap.add_argument("--cache", type=Path, help="keep the caches under this folder (one per --src) for the next run")
    a = ap.parse_args()
    srcs = [p.resolve() for p in (a.src or [Path(__file__).resolve().parent.parent / "src"])]
    if a.cache:
        caches = [str(a.cache / f"src{i}") for i in range(len(srcs))]
    else:
        caches = [tempfile.mkdtemp(prefix="lagoon-start-") for _ in srcs]
    rows: list[list[dict]] = [[] for _ in srcs]
    try:
        for src, cache in zip(srcs, caches, strict=True):
            first = run_child(src, cache, a.threads)  # fills the caches (the step may compile)
            print(f"{src}: first start {first['start']:.1f} s (compiled {first['compiled']})", flush=True)
        for _ in range(a.repeats):
            for i, (src, cache) in enumerate(zip(srcs, caches, strict=True)):
                rows[i].append(run_child(src, cache, a.threads))
    finally:
        for cache in caches if not a.cache else ():
            shutil.rmtree(cache, ignore_errors=True)
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for f in line.split(":")[1].split() if f.startswith(("avx", "amx", "fma", "f16c"))})
    print(f"CPU flags: {' '.join(flags)}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{a.threads} threads; medians of {a.repeats} warm starts")
    keys = ["start", "cpu", "import torch", "import lagoon.engine", "checkpoint", "tokenizer", "kv_cache",
            "step load", "first call"]
    print(f"{'src':40s} " + " ".join(f"{k:>12s}" for k in keys) + "  imports")
    for src, rs in zip(srcs, rows, strict=True):
        med = {k: statistics.median(r.get(k, 0.0) for r in rs) for k in keys}
        imported = ",".join(m for m in ("transformers", "dynamo", "inductor") if rs[-1].get(m)) or "-"
        loaded = "loaded" if all(r["loaded"] for r in rs) else "NOT loaded from the cache"
        loaded += f", {rs[-1].get('backend', 'dynamo')}"
        print(f"{str(src)[-40:]:40s} " + " ".join(f"{med[k]:12.3f}" for k in keys) + f"  {imported} ({loaded})")


if __name__ == "__main__":
    main()
