"""Engine speed on the embedded SmolLM2-135M GGUF (Q4_1), every reference in this one run:
llama.cpp on the same file (when llama-cpp-python imports), transformers (float32, same file) and
each Lagoon precision with the decode step compiled and eager. Per row: load s (in process), first
start s (a fresh process and an empty compile cache: load + compile) and warm start s (a fresh
process, the cache filled), prefill and decode tok/s and their ratios to llama.cpp; then decode
tok/s at batch 1, 4 and 8, and time-to-first-token for a long shared prefix with the prefix cache
on and off. Prints the CPU features it ran with.

    .venv/bin/python benchmarks/bench_engine.py [--quick] [--threads N] [--no-starts] [--precisions native,float32]

llama.cpp is optional (extra `bench`): `CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install
llama-cpp-python==0.3.36` builds it from source (~7 min on 2 cores); on CPUs whose kernel refuses
AMX tiles add `-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON` (the
native build segfaults there on the first forward).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lagoon.config import EngineSection  # noqa: E402
from lagoon.engine import embedded_gguf_path, load_model  # noqa: E402
from lagoon.engine.kernels import kernel_plan  # noqa: E402

TEXT = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
        "Lagoon routes each coding task to the model that fits it, retrieves context, and runs tools. ")


def prompt_ids(engine, n: int) -> list[int]:
    ids = engine.encode(TEXT * (n // 20 + 1))
    return ids[:n]


def start_s(precision: str, cache_dir: str, threads: int) -> tuple[float, float]:
    """Seconds for `load_model` (load + compile or cached compile + warm-up) in a fresh process, and
    of those the decode step's own warm-up (compile, or load from the cache, plus its first call)."""
    code = ("import time; t = time.perf_counter()\n"
            "from lagoon.config import EngineSection\nfrom lagoon.engine import load_model\n"
            # threads through the engine (its compute thread): torch.set_num_threads on this main
            # thread first made every OpenMP kernel of the compute thread ~100x slower (measured)
            f"e = load_model('embedded', precision={precision!r}, config=EngineSection(compile=True, max_batch_size=8, "
            f"threads={threads}))\n"
            "print('START', time.perf_counter() - t, e.step.warm_up_s, e.step.compiled)\n")
    env = {**os.environ, "LAGOON_CACHE_DIR": cache_dir, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=1800)
    line = next((x for x in r.stdout.splitlines() if x.startswith("START")), None)
    if line is None:
        raise RuntimeError(f"start of {precision} failed: {r.stderr[-1500:]}")
    return float(line.split()[1]), float(line.split()[2])


def lagoon_row(precision: str, compiled: bool, prompt: list[int], n_new: int, repeats: int) -> dict:
    t = time.perf_counter()
    engine = load_model("embedded", precision=precision,
                        config=EngineSection(max_seq_len=4096, max_batch_size=8, prefix_cache=False,
                                             compile=compiled, threads=torch.get_num_threads()))
    load_s = time.perf_counter() - t
    # warm-up on the measured length (a first call of a shape pays one-time allocations: ~2x its ttft)
    engine.complete(prompt, engine.params(max_new_tokens=4, ignore_eos=True))
    pre, dec = [], []
    for _ in range(repeats):
        c = engine.complete(prompt, engine.params(max_new_tokens=n_new, ignore_eos=True))
        pre.append(len(prompt) / c.ttft_s)
        dec.append((c.completion_tokens - 1) / (c.duration_s - c.ttft_s))
    name = f"lagoon {precision} {'compiled' if engine.step.compiled else 'eager'}"
    return {"name": name, "engine": engine, "load_s": load_s, "prefill": max(pre), "decode": max(dec)}


def batch_decode(engine, prompt: list[int], batch: int, n_new: int) -> float:
    """Aggregate decode tok/s with `batch` requests decoded together."""
    done: list = [None] * batch

    def one(i: int) -> None:
        done[i] = engine.complete(prompt, engine.params(max_new_tokens=n_new, ignore_eos=True))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=one, args=(i,)) for i in range(batch)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    end = time.perf_counter() - t0
    last_first = max(c.ttft_s for c in done)  # every request is decoding from here on
    return sum(c.completion_tokens - 1 for c in done) / max(end - last_first, 1e-9)


def transformers_row(prompt: list[int], n_new: int, repeats: int) -> dict:
    from transformers import AutoModelForCausalLM

    path = embedded_gguf_path()
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t
    x = torch.tensor([prompt])
    pre, dec = [], []
    with torch.no_grad():
        model.generate(x[:, :16], max_new_tokens=4, do_sample=False)
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            p = time.perf_counter() - t
            t = time.perf_counter()
            model.generate(x, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=False)
            total = time.perf_counter() - t
            pre.append(len(prompt) / p)
            dec.append((n_new - 1) / max(total - p, 1e-9))
    return {"name": "transformers float32", "load_s": load_s, "prefill": max(pre), "decode": max(dec)}


_LLAMA_CPP = """
import json, sys, time
from llama_cpp import Llama
path, prompt, n_new, repeats, threads = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
t = time.perf_counter()
llm = Llama(path, n_ctx=4096, verbose=False, n_threads=threads, n_threads_batch=threads)
load_s = time.perf_counter() - t
llm.eval(prompt)  # warm-up on the measured length, as the Lagoon rows get
pre, dec = [], []
for _ in range(repeats):
    llm.reset()
    t = time.perf_counter()
    llm.eval(prompt)
    pre.append(len(prompt) / (time.perf_counter() - t))
    t = time.perf_counter()
    for _ in range(n_new - 1):
        llm.eval([llm.sample(temp=0.0)])
    dec.append((n_new - 1) / (time.perf_counter() - t))
print("LLAMA_CPP", json.dumps({"load_s": load_s, "prefill": max(pre), "decode": max(dec)}))
"""


def llama_cpp_row(prompt: list[int], n_new: int, repeats: int) -> dict | None:
    """llama.cpp in a child process: its OpenMP pool in this process made libgomp throttle the
    engine's compute thread (every Lagoon kernel ~3x slower after it ran here; measured)."""
    import importlib.util
    import json

    if importlib.util.find_spec("llama_cpp") is None:
        return None
    r = subprocess.run([sys.executable, "-c", _LLAMA_CPP, str(embedded_gguf_path()), json.dumps(prompt), str(n_new),
                        str(repeats), str(torch.get_num_threads())], capture_output=True, text=True, timeout=1800)
    line = next((x for x in r.stdout.splitlines() if x.startswith("LLAMA_CPP")), None)
    if line is None:
        raise RuntimeError(f"llama.cpp failed: {r.stderr[-1500:]}")
    return {"name": "llama.cpp (Q4_1)", **json.loads(line.split(" ", 1)[1])}


def prefix_rows(prefix_len: int) -> list[tuple[str, float, int]]:
    rows = []
    for on in (False, True):
        engine = load_model("embedded", precision="native",
                            config=EngineSection(max_seq_len=4096, max_batch_size=1, prefix_cache=on,
                                                 threads=torch.get_num_threads()))
        prefix = prompt_ids(engine, prefix_len)
        engine.complete(prefix + engine.encode(" step one"), engine.params(max_new_tokens=2))
        c = engine.complete(prefix + engine.encode(" step two"), engine.params(max_new_tokens=2))
        rows.append((f"prefix cache {'on' if on else 'off'}", c.ttft_s, c.cached_tokens))
        engine.close()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="shorter prompt/decode, one repeat, 512-token prefix")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-starts", action="store_true", help="skip the first/warm start subprocesses")
    ap.add_argument("--precisions", default="native,float32,bfloat16",
                    help="Lagoon precisions to run compiled (native also runs eager); each compiles once")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    threads = torch.get_num_threads()
    n_prompt, n_new, repeats, n_prefix = (128, 32, 1, 512) if a.quick else (128, 64, 3, 2048)
    precisions = [p for p in a.precisions.split(",") if p]
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for f in line.split() if f.startswith(("avx", "amx"))}) if os.path.exists("/proc/cpuinfo") else []
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"Lagoon kernels {kernel_plan().describe()}, {threads} threads\nCPU flags: {' '.join(flags)}")

    starts: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {}
    if not a.no_starts:
        for precision in precisions[:2]:
            with tempfile.TemporaryDirectory() as tmp:
                first = start_s(precision, tmp, threads)
                starts[precision] = (first, start_s(precision, tmp, threads))

    probe = load_model("embedded", precision="float32", config=EngineSection(max_seq_len=64, max_batch_size=1,
                                                                             compile=False))
    prompt = prompt_ids(probe, n_prompt)
    probe.close()
    cpp = llama_cpp_row(prompt, n_new, repeats)
    rows = []
    runs = [(p, True) for p in precisions]
    if "native" in precisions:
        runs.insert(1, ("native", False))
    for precision, compiled in runs:
        rows.append(lagoon_row(precision, compiled, prompt, n_new, repeats))
    native = rows[0]["engine"]
    batch_decode(native, prompt[:16], 4, 4)  # compiles (or loads) the dynamic-batch graph outside the timing
    batches = {b: batch_decode(native, prompt, b, n_new) for b in (1, 4, 8)}
    batch_name = rows[0]["name"]
    for r in rows:
        r.pop("engine").close()
    rows.append(transformers_row(prompt, n_new, repeats))
    if cpp:
        rows.insert(0, cpp)
    ref = cpp or rows[-1]
    print(f"\nembedded SmolLM2-135M Q4_1, prompt {n_prompt} tokens, decode {n_new} tokens, {threads} threads; "
          f"ratios to {ref['name']}")
    print("(start s: a fresh process's load_model, in brackets the decode step's own share)")
    print(f"{'engine':28} {'load s':>7} {'first start s':>14} {'warm start s':>13} {'prefill tok/s':>14} "
          f"{'decode tok/s':>13} {'prefill x':>10} {'decode x':>9}")
    for r in rows:
        st = next((v for k, v in starts.items() if r["name"].startswith(f"lagoon {k} compiled")), None)
        first, warm = ((f"{st[0][0]:.1f} ({st[0][1]:.1f})".rjust(14), f"{st[1][0]:.1f} ({st[1][1]:.1f})".rjust(13))
                       if st else (f"{'-':>14}", f"{'-':>13}"))
        print(f"{r['name']:28} {r['load_s']:7.1f} {first} {warm} {r['prefill']:14.1f} {r['decode']:13.1f} "
              f"{r['prefill'] / ref['prefill']:10.2f} {r['decode'] / ref['decode']:9.2f}")
    if not cpp:
        print("llama.cpp: not installed (see this file's docstring; extra `bench`)")
    print(f"\n{batch_name}, requests decoded together: "
          + ", ".join(f"batch {b}: {v:.1f} tok/s" for b, v in batches.items()))
    pr = prefix_rows(n_prefix)
    print(f"\nshared {n_prefix}-token prefix, second request (native):")
    for name, ttft, cached in pr:
        print(f"{name:24} ttft {ttft * 1000:8.1f} ms   cached tokens {cached}")
    print(f"prefix cache speed-up on time-to-first-token: {pr[0][1] / pr[1][1]:.1f}x")


if __name__ == "__main__":
    main()
