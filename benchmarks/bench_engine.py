"""Engine speed on the embedded SmolLM2-135M GGUF: prefill and decode tok/s for Lagoon (native
4-bit and float32) against transformers `generate` (float32, same file) and, when llama-cpp-python
is installed, llama.cpp; plus time-to-first-token for a long shared prefix with the prefix cache on
and off. Every reference runs in this process; the table prints ratios.

    .venv/bin/python benchmarks/bench_engine.py [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from lagoon.config import EngineSection  # noqa: E402
from lagoon.engine import embedded_gguf_path, load_model  # noqa: E402

TEXT = ("def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n\n"
        "Lagoon routes each coding task to the model that fits it, retrieves context, and runs tools. ")


def prompt_ids(engine, n: int) -> list[int]:
    ids = engine.encode(TEXT * (n // 20 + 1))
    return ids[:n]


def lagoon_row(precision: str, prompt: list[int], n_new: int, repeats: int) -> dict:
    t = time.perf_counter()
    engine = load_model("embedded", precision=precision,
                        config=EngineSection(max_seq_len=4096, max_batch_size=1, prefix_cache=False))
    load_s = time.perf_counter() - t
    engine.complete(prompt[:16], engine.params(max_new_tokens=4, ignore_eos=True))  # warm-up
    pre, dec = [], []
    for _ in range(repeats):
        c = engine.complete(prompt, engine.params(max_new_tokens=n_new, ignore_eos=True))
        pre.append(len(prompt) / c.ttft_s)
        dec.append((c.completion_tokens - 1) / (c.duration_s - c.ttft_s))
    engine.close()
    return {"name": f"lagoon {precision}", "load_s": load_s, "prefill": max(pre), "decode": max(dec)}


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


def llama_cpp_row(prompt: list[int], n_new: int) -> dict | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    t = time.perf_counter()
    llm = Llama(str(embedded_gguf_path()), n_ctx=4096, verbose=False, n_threads=torch.get_num_threads())
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    llm.eval(prompt)
    p = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n_new):
        tok = llm.sample(temp=0.0)
        llm.eval([tok])
    d = time.perf_counter() - t
    return {"name": "llama.cpp (Q4_1)", "load_s": load_s, "prefill": len(prompt) / p, "decode": n_new / d}


def prefix_rows(prefix_len: int) -> list[tuple[str, float, int]]:
    rows = []
    for on in (False, True):
        engine = load_model("embedded", precision="native",
                            config=EngineSection(max_seq_len=4096, max_batch_size=1, prefix_cache=on))
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
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    n_prompt, n_new, repeats, n_prefix = (128, 32, 1, 512) if a.quick else (256, 64, 2, 2048)
    probe = load_model("embedded", precision="float32", config=EngineSection(max_seq_len=64, max_batch_size=1))
    prompt = prompt_ids(probe, n_prompt)
    probe.close()

    rows = [lagoon_row("native", prompt, n_new, repeats), lagoon_row("float32", prompt, n_new, repeats),
            transformers_row(prompt, n_new, repeats)]
    cpp = llama_cpp_row(prompt, n_new)
    if cpp:
        rows.append(cpp)
    ref = rows[2]
    print(f"\nembedded SmolLM2-135M Q4_1, prompt {n_prompt} tokens, decode {n_new} tokens, "
          f"{torch.get_num_threads()} threads")
    print(f"{'engine':24} {'load s':>7} {'prefill tok/s':>14} {'decode tok/s':>13} {'prefill x HF':>13} {'decode x HF':>12}")
    for r in rows:
        print(f"{r['name']:24} {r['load_s']:7.1f} {r['prefill']:14.1f} {r['decode']:13.1f} "
              f"{r['prefill'] / ref['prefill']:13.2f} {r['decode'] / ref['decode']:12.2f}")
    if cpp:
        print(f"lagoon native / llama.cpp decode: {rows[0]['decode'] / cpp['decode']:.2f}x")
    else:
        print("llama.cpp: not installed (pip install llama-cpp-python, extra `bench`)")
    pr = prefix_rows(n_prefix)
    print(f"\nshared {n_prefix}-token prefix, second request (native):")
    for name, ttft, cached in pr:
        print(f"{name:24} ttft {ttft * 1000:8.1f} ms   cached tokens {cached}")
    print(f"prefix cache speed-up on time-to-first-token: {pr[0][1] / pr[1][1]:.1f}x")


if __name__ == "__main__":
    main()
