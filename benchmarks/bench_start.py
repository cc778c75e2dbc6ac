"""Warm start of the embedded SmolLM2-135M GGUF with the decode step compiled, by phase: what
`benchmarks/bench_engine.py`'s warm start (`start_s`) measures — a fresh process importing
`lagoon.engine.engine` (as `lagoon generate` / `lagoon serve` do: `lagoon`, then the engine, which
imports torch) and running `load_model('embedded', precision='native', config=EngineSection(
compile=True, max_batch_size=8, threads=N))`, decode-step warm-up included, with the caches filled
(the saved step, the repack cache, the tokenizer record) — split into: import torch (timed inside
the engine's import), the rest of importing the engine, checkpoint, tokenizer, KV cache, the step's
load and its first call. Also the process's CPU seconds (steadier than wall time on a shared
machine), the seconds spent in the cyclic garbage collector, whether transformers / jinja2 /
torch._dynamo / torch._inductor got imported, and the step's backend (`LAGOON_COMPILE_BACKEND=dynamo`
in the environment times dynamo's saved artefact instead of the AOTInductor package). `--cli` also
times what a user waits for: `lagoon generate -m embedded -n 1` in a fresh process, to its exit.

    .venv/bin/python benchmarks/bench_start.py [--repeats 5] [--threads 2] [--src PATH ...] [--cli]

The starts use the engine's own cache (`LAGOON_CACHE_DIR`, else ~/.cache/lagoon: what a user's
warm start finds); one untimed start per source fills it first (it compiles, minutes, only when the
cache holds no step for this model, torch and CPU) and the children's bytecode cache (a temporary
`PYTHONPYCACHEPREFIX`, as a user's Python keeps `__pycache__`; `--as-environment` keeps this
environment's setting, e.g. PYTHONDONTWRITEBYTECODE=1, which compiles every module from source on
every start: ~0.2 s more). `--fresh-cache` gives each source its own
temporary cache instead (or `--cache DIR`: DIR/srcN, kept for the next run). Each `--src` is a
`src` folder put first on PYTHONPATH (default: this checkout's), e.g. a worktree of an older
commit for a before/after; several are run interleaved (A, B, A, B ...). Prints medians per source
and the CPU features.
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
import time
from pathlib import Path

CHILD = """
import time; t0 = time.perf_counter()
import gc, importlib.abc, importlib.util, json, sys
gc_s = [0.0, 0.0]
def on_gc(phase, info):
    if phase == "start": gc_s[1] = time.perf_counter()
    else: gc_s[0] += time.perf_counter() - gc_s[1]
gc.callbacks.append(on_gc)
torch_s = [0.0]
class TimeTorch(importlib.abc.MetaPathFinder):  # times torch's own import wherever the engine triggers it
    def find_spec(self, name, path=None, target=None):
        if name != "torch": return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            t = time.perf_counter(); run(module); torch_s[0] = time.perf_counter() - t
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, TimeTorch())
t_setup = time.perf_counter()
import lagoon.engine.engine as E
import lagoon.engine as L
from lagoon.config import EngineSection
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
total = time.perf_counter() - t0 - (t_setup - t0)
load = e.step.ready_s.get(1, 0.0)
print("ROW", json.dumps({{"start": total, "cpu": time.process_time(), "gc": gc_s[0], "import torch": torch_s[0],
      "import lagoon.engine": t_lagoon - t_setup - torch_s[0], **spent, "step load": load,
      "first call": e.step.warm_up_s - load, "compiled": e.step.compiled, "loaded": 1 in e.step.loaded_buckets,
      "backend": e.step.backend, **{{m: m in sys.modules for m in ("transformers", "jinja2", "torch._dynamo", "torch._inductor")}}}}))
e.close()
"""
CLI = "import sys; from lagoon.cli.app import main; sys.argv = ['lagoon', *sys.argv[1:]]; main()"
IMPORTS = ("transformers", "jinja2", "torch._dynamo", "torch._inductor")


PYCACHE: str | None = None  # set by main: where the children keep their bytecode


def child_env(src: Path, cache: str | None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "HF_HUB_OFFLINE": "1"}
    if cache is not None:
        env["LAGOON_CACHE_DIR"] = cache
    if PYCACHE is not None:  # bytecode cached, as a user's Python does: not compiled from source every start
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = PYCACHE
    return env


def run_child(src: Path, cache: str | None, threads: int) -> dict:
    r = subprocess.run([sys.executable, "-c", CHILD.format(threads=threads)], capture_output=True, text=True,
                       env=child_env(src, cache), timeout=1800)
    line = next((x for x in r.stdout.splitlines() if x.startswith("ROW")), None)
    if line is None:
        raise RuntimeError(f"the start with {src} failed: {r.stderr[-2000:]}")
    return json.loads(line[4:])


def run_cli(src: Path, cache: str | None, threads: int) -> float:
    """Seconds of `lagoon generate -m embedded -n 1` in a fresh process, to its exit."""
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CLI, "generate", "-m", "embedded", "-p", "def add(a, b):", "-n", "1",
                        "-c", f"engine.threads={threads}"], capture_output=True, text=True, env=child_env(src, cache),
                       timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(f"`lagoon generate` with {src} failed: {r.stderr[-2000:]}")
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--src", type=Path, action="append", help="a src folder to time (repeatable)")
    ap.add_argument("--cli", action="store_true", help="also time `lagoon generate -m embedded -n 1` to its exit")
    ap.add_argument("--as-environment", action="store_true",
                    help="keep this environment's bytecode setting (PYTHONDONTWRITEBYTECODE=1 compiles every module "
                         "from source on every start); default: bytecode cached in a temporary folder")
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--fresh-cache", action="store_true", help="a temporary cache per source (the first start compiles)")
    where.add_argument("--cache", type=Path, help="keep the caches under this folder (one per --src) for the next run")
    a = ap.parse_args()
    srcs = [p.resolve() for p in (a.src or [Path(__file__).resolve().parent.parent / "src"])]
    caches: list[str | None]
    if a.cache:
        caches = [str(a.cache / f"src{i}") for i in range(len(srcs))]
    elif a.fresh_cache:
        caches = [tempfile.mkdtemp(prefix="lagoon-start-") for _ in srcs]
    else:
        caches = [None] * len(srcs)  # the engine's own: LAGOON_CACHE_DIR or ~/.cache/lagoon
    rows: list[list[dict]] = [[] for _ in srcs]
    global PYCACHE
    if not a.as_environment:
        PYCACHE = tempfile.mkdtemp(prefix="lagoon-start-pycache-")
    try:
        for src, cache in zip(srcs, caches, strict=True):
            first = run_child(src, cache, a.threads)  # fills the caches (the step compiles if none is saved)
            print(f"{src}: first start {first['start']:.1f} s (compiled {first['compiled']})", flush=True)
        for _ in range(a.repeats):
            for i, (src, cache) in enumerate(zip(srcs, caches, strict=True)):
                rows[i].append(run_child(src, cache, a.threads))
                if a.cli:
                    rows[i][-1]["cli"] = run_cli(src, cache, a.threads)
    finally:
        for cache in caches if a.fresh_cache else ():
            shutil.rmtree(cache, ignore_errors=True)
        if PYCACHE is not None:
            shutil.rmtree(PYCACHE, ignore_errors=True)
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for f in line.split(":")[1].split() if f.startswith(("avx", "amx", "fma", "f16c"))})
    print(f"CPU flags: {' '.join(flags)}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"{a.threads} threads; medians of {a.repeats} warm starts; bytecode "
          + ("as this environment sets it" if PYCACHE is None else "cached (filled by the first start)"))
    keys = ["start", "cpu", "gc", "import torch", "import lagoon.engine", "checkpoint", "tokenizer", "kv_cache",
            "step load", "first call"] + (["cli"] if a.cli else [])
    print(f"{'src':40s} " + " ".join(f"{k:>12s}" for k in keys) + "  imports")
    for src, rs in zip(srcs, rows, strict=True):
        med = {k: statistics.median(r.get(k, 0.0) for r in rs) for k in keys}
        imported = ",".join(m for m in IMPORTS if rs[-1].get(m)) or "-"
        loaded = "loaded" if all(r["loaded"] for r in rs) else "NOT loaded from the cache"
        loaded += f", {rs[-1].get('backend', 'dynamo')}"
        print(f"{str(src)[-40:]:40s} " + " ".join(f"{med[k]:12.3f}" for k in keys) + f"  {imported} ({loaded})")
    if len(srcs) > 1:
        base = {k: statistics.median(r.get(k, 0.0) for r in rows[0]) for k in ("start", "cpu", "cli") if k in keys}
        for src, rs in zip(srcs[1:], rows[1:], strict=True):
            ratio = {k: statistics.median(r.get(k, 0.0) for r in rs) / v for k, v in base.items() if v}
            print(f"{str(src)[-40:]:40s} vs the first: " + ", ".join(f"{k} x{x:.2f}" for k, x in ratio.items()))


if __name__ == "__main__":
    main()
