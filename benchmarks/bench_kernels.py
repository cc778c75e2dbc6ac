"""Per-call time of Lagoon's native 4-bit kernel (`lagoon.engine.cpu_kernels`, int8 activations)
against torch's int4pack and int8pack kernels, on the embedded SmolLM2-135M's decode shapes, in one
process, interleaved (A, B, A, B ...: a noisy machine disturbs both sides alike).

    PYTHONPATH=$PWD/src .venv/bin/python benchmarks/bench_kernels.py [--threads 2] [--rounds 15] [--m 1 4 8]
        [--attention-s 130 500 1000 2000] [--only attention]

Columns: best-of-rounds us per call of torch int4pack (`_weight_int4pack_mm_for_cpu`, bf16), torch
int8pack (`_weight_int8pack_mm`, bf16), Lagoon's kernel with AVX-512 VNNI and with AVX2 (when the
CPU has them), and the ratios int4pack / Lagoon. The head row's Lagoon columns run its int8 kernel
(`lagoon::i8_matvec`), to be read against int8pack, the head's kernel otherwise. The last row per M
sums one decoder layer (q, k, v, o, gate, up, down) times 30 layers: the 4-bit share of a decode step.

The attention table times one layer's decode attention (batch 1, 9 query / 3 kv heads, head_dim 64,
bf16 paged pool) at several lengths S: SDPA over the gathered blocks (the cache's `update` path:
gather [B, S, K, D] twice, then SDPA with the mask) against `lagoon::decode_attention` reading the
pool in place, per ISA; and the 30 layers' sum. Everything runs on
`lagoon.engine.compute`'s thread, as the engine does (see /work/notes/common.md's libgomp fact).
"""

from __future__ import annotations

import argparse
import time

import torch

from lagoon.engine import compute, cpu_kernels

SHAPES = {"q/o 576x576": (576, 576), "k/v 192x576": (192, 576), "gate/up 1536x576": (1536, 576),
          "down 576x1536": (576, 1536), "head 49152x576 (int8)": (49152, 576)}
LAYER = {"q/o 576x576": 2, "k/v 192x576": 2, "gate/up 1536x576": 2, "down 576x1536": 1}
N_LAYERS = 30


def _calls(N: int, K: int, M: int, g: torch.Generator) -> dict:
    kb = K // 32
    d = torch.rand(N * kb, 1, generator=g) * 0.02 + 1e-3
    m = -torch.rand(N * kb, 1, generator=g) * 0.15
    q = torch.randint(0, 16, (N * kb, 32), generator=g, dtype=torch.uint8)
    x = torch.randn(M, K, generator=g).bfloat16()
    int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(N, K).int(), 2)
    sz = torch.stack([d.reshape(N, kb), (m + 8 * d).reshape(N, kb)], -1).transpose(0, 1).contiguous().bfloat16()
    w8 = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    s8 = torch.rand(N, generator=g).bfloat16()
    calls = {"int4pack": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, int4, 32, sz),
             "int8pack": lambda: torch._weight_int8pack_mm(x, w8, s8)}
    head = N == 49152  # the output head: int8 weights (blocks of 32) on lagoon::i8_matvec
    packed = cpu_kernels.pack_i8(*cpu_kernels.quantize_i8(w8.float())) if head else cpu_kernels.pack_q4(d, m, q, N, K)
    op = cpu_kernels.i8_matvec if head else cpu_kernels.q4_matvec
    for isa in ("avx512", "avx2"):
        if cpu_kernels.cpu_has(isa):
            calls[f"lagoon-{isa}"] = lambda isa=isa: op(x, packed, N, isa)
    return calls


def _time(fn, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n * 1e6


def run(rounds: int, ms: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    for M in ms:
        print(f"\nM = {M} (us per call, best of {rounds} interleaved rounds)")
        totals: dict[str, float] = {}
        header = None
        for label, (N, K) in SHAPES.items():
            calls = _calls(N, K, M, g)
            if header is None:
                header = list(calls)
                print(f"{'shape':24}" + "".join(f"{c:>15}" for c in header) + f"{'int4/vnni':>11}{'int4/avx2':>11}")
            n = max(3, int(2e5 // (N * K // 64)))  # ~a few ms a round whatever the shape
            best = {c: float("inf") for c in calls}
            for c in calls:
                calls[c]()  # warm
            for _ in range(rounds):
                for c, fn in calls.items():
                    best[c] = min(best[c], _time(fn, n))
            ratio = [best["int4pack"] / best[c] if c in best else float("nan") for c in ("lagoon-avx512", "lagoon-avx2")]
            print(f"{label:24}" + "".join(f"{best[c]:15.1f}" for c in header) + "".join(f"{r:11.2f}" for r in ratio))
            for c in calls:
                totals[c] = totals.get(c, 0.0) + best[c] * LAYER.get(label, 0) * N_LAYERS
        ratio = [totals["int4pack"] / totals[c] if c in totals else float("nan") for c in ("lagoon-avx512", "lagoon-avx2")]
        print(f"{'4-bit linears x30 (ms)':24}" + "".join(f"{totals[c] / 1e3:15.2f}" for c in header)
              + "".join(f"{r:11.2f}" for r in ratio))


def _attention_calls(S: int, kp: torch.Tensor, vp: torch.Tensor, isas: list[str], g: torch.Generator) -> dict:
    import torch.nn.functional as F

    N, K, D = kp.shape
    B, H = 1, 9
    # the sequence's blocks of 16 scattered over the pool, as a paged cache's are
    read = (torch.randperm(N // 16, generator=g)[: -(-S // 16)][:, None] * 16 + torch.arange(16)).flatten()[:S][None]
    pos = torch.full((B, 1), S - 1)
    mask = (torch.arange(S)[None, None, :] <= pos[:, :, None])[:, None]
    q = torch.randn(B, H, 1, D, generator=g).bfloat16()
    calls = {"sdpa": lambda: F.scaled_dot_product_attention(
        q, kp[read].transpose(1, 2), vp[read].transpose(1, 2), attn_mask=mask, enable_gqa=True)}
    for isa in isas:
        calls[isa] = lambda isa=isa: cpu_kernels.decode_attention(q[:, :, 0], kp, vp, read, pos, D**-0.5, isa)
    return calls


def run_attention(rounds: int, lengths: list[int]) -> None:
    g = torch.Generator().manual_seed(0)
    kp, vp = (torch.randn(16384, 3, 64, generator=g).bfloat16() for _ in range(2))
    print(f"\ndecode attention, one layer (B 1, H 9, K 3, D 64, bf16 pool; us per call, best of {rounds})")
    isas = [i for i in ("avx512", "avx2") if cpu_kernels.cpu_has(i)]
    print(f"{'S':>6}{'sdpa+gather':>14}" + "".join(f"{'lagoon-' + i:>16}" for i in isas) + f"{'ratio':>8}{'x30 saved ms':>14}")
    for S in lengths:
        calls = _attention_calls(S, kp, vp, isas, g)
        best = {c: float("inf") for c in calls}
        for _ in range(rounds):
            for c, fn in calls.items():
                best[c] = min(best[c], _time(fn, 20))
        print(f"{S:6}{best['sdpa']:14.1f}" + "".join(f"{best[i]:16.1f}" for i in isas)
              + f"{best['sdpa'] / best[isas[0]]:8.2f}{(best['sdpa'] - best[isas[0]]) * N_LAYERS / 1e3:14.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--m", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--attention-s", type=int, nargs="+", default=[130, 500, 1000, 2000])
    ap.add_argument("--only", choices=["matvec", "attention"], help="one table only")
    a = ap.parse_args()
    if not cpu_kernels.available():
        raise SystemExit(f"Lagoon's kernels are unavailable: {cpu_kernels.unavailable_reason()}")
    flags = [f for f in ("avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "avx2", "fma", "f16c")
             if f in open("/proc/cpuinfo").read().split()]
    print(f"torch {torch.__version__}, capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{a.threads} threads, CPU flags: {' '.join(flags)}")
    def tables() -> None:
        torch.set_num_threads(a.threads)
        if a.only != "attention":
            run(a.rounds, a.m)
        if a.only != "matvec":
            run_attention(a.rounds, a.attention_s)

    compute.call(tables)


if __name__ == "__main__":
    main()
