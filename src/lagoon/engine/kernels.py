"""Which weight-only kernels a GGUF model runs on, chosen once at load time from the CPU's features.

Measured per call at decode (M = 1, bf16 activations) on SmolLM2-135M's shapes, torch 2.13, the same
machine with torch's AVX-512 kernels and then forced to its AVX2 kernels (``ATEN_CPU_CAPABILITY``):

    576x1536 weight        int4pack (g32)   int8pack   bf16 F.linear
    AVX-512                26 us            22 us      62 us
    AVX2                   41 us            27 us      59 us

so on AVX-512 a 4-bit GGUF linear could stay 4-bit (`_weight_int4pack_mm_for_cpu`, exact for Q4_0 /
Q4_1 / Q4_K) and on AVX2 it is re-quantized once to int8 per output channel (`_weight_int8pack_mm`,
about a third faster there, at twice the bytes). A Q8_0 linear runs exactly (up to bf16 scales) on
AVX-512 as two int4 passes over its codes' nibbles (`gguf_linear.Q8Linear`): ~1.9x int8pack's time
and about bf16's (1 thread, M = 1: 576x1536 104 / 54 / 108 us, 4096² 1.69 / 0.92 / 2.0 ms) at half
bf16's bytes, because re-quantizing per channel would add ~0.8% relative weight error on top of
Q8_0's own ~0.55% (llama.cpp's Q8_0 tensors of the embedded model). On AVX2, where int4pack is the
slower kernel, Q8_0 is re-quantized to int8 per channel. The output projection (tied to a Q8_0
embedding in most small GGUFs) runs int8 everywhere: 1.3-1.5 ms against 3.2 ms in bf16 for a
49152x576 head.

Both are beaten at decode by Lagoon's own kernel (`lagoon.engine.cpu_kernels`: int8 activations,
integer dot products; `q4="q8act_vnni"` with AVX-512 VNNI, else `"q8act_avx2"`), which AVX-512 and
AVX2 CPUs plan whenever its library builds; where it does not, the table above decides. Measured
(benchmarks/bench_kernels.py, interleaved, a busy shared machine, 1 thread, M = 1): the model's
4-bit linears x30 2.1 ms (VNNI) / 2.5 ms (AVX2 code) against int4pack's 5.3 ms; M = 4 and 8 ~2.0x
int4pack on VNNI (rows share each unpacked tile), ~1.2x on AVX2; the 49152x576 head ~1.2 ms against
int8pack's ~3.4 ms. It holds the GGUF's own 4-bit codes with f16 scales, so it replaces int8pack on
AVX2 too. The output head then runs on its int8 sibling (`lagoon::i8_matvec`, int8 blocks of 32: a
Q8_0 head's own codes) instead of int8pack. End to end (the embedded model, compiled, 2 threads,
two engines in one process, alternating, load ~3.5 from other jobs): 86-89 tok/s against 68-76 on
torch's kernels. The price is int8 activations: logits 2.5-4.5% from the float32 load's against
2.3-3.3% on torch's kernels (tests/engine/test_cpu_kernels.py, slow).

`LAGOON_CPU_ISA` (``avx512`` | ``avx2`` | ``default``) forces the choice, so the AVX2 plan can be run
and tested on an AVX-512 machine (set ``ATEN_CPU_CAPABILITY=avx2`` too to make torch's own kernels
match). Prefill-sized inputs (16+ tokens) multiply by a dense copy of the same weight values instead:
the matrix-vector kernels are 8-10x slower than a GEMM there (576x1536, M = 1000: int4pack 20 ms,
bf16 1.8 ms, fp32 11 ms); bf16 on AVX-512, fp32 on AVX2 (whose bf16 GEMM has no fast path). The
copies cost 2-4 bytes a weight, so a GGUF whose 4-bit linears would need more than
`DENSE_PREFILL_MAX_BYTES` keeps prefill on the low-bit kernels. This module does not compile anything (see `lagoon.engine.compile`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import torch

from lagoon.errors import ConfigError

__all__ = ["ISAS", "KernelPlan", "cpu_isa", "kernel_plan", "DENSE_PREFILL_MAX_BYTES"]

ISAS = ("avx512", "avx2", "default")
DENSE_PREFILL_MAX_BYTES = 2 << 30


def cpu_isa() -> str:
    """``avx512`` | ``avx2`` | ``default``: `LAGOON_CPU_ISA` if set, else what torch dispatches to."""
    forced = os.environ.get("LAGOON_CPU_ISA", "").strip().lower()
    if forced:
        if forced not in ISAS:
            raise ConfigError(f"LAGOON_CPU_ISA={forced!r} is unknown; use one of {', '.join(ISAS)} or unset it")
        return forced
    cap = torch.backends.cpu.get_cpu_capability().upper()
    return "avx512" if cap.startswith("AVX512") else "avx2" if cap.startswith("AVX2") else "default"


@dataclass(frozen=True)
class KernelPlan:
    """The kernels a loaded GGUF uses: `q4` for 4-bit linears, `q8` for Q8_0 linears, `head` for the
    output projection."""

    isa: str
    q4: Literal["q8act_vnni", "q8act_avx2", "int4pack", "int8pack"]
    q8: Literal["int4pack_x2", "int8pack"]
    head: Literal["q8act_vnni", "q8act_avx2", "int8pack"]
    prefill: Literal["bfloat16", "float32"]  # dtype of the dense copies prefill multiplies by

    @property
    def q4_isa(self) -> str | None:
        """The `lagoon.engine.cpu_kernels` ISA the 4-bit linears run on, or None (torch's kernels)."""
        return {"q8act_vnni": "avx512", "q8act_avx2": "avx2"}.get(self.q4)

    @property
    def head_isa(self) -> str | None:
        """The `lagoon.engine.cpu_kernels` ISA the output head runs on, or None (int8pack)."""
        return {"q8act_vnni": "avx512", "q8act_avx2": "avx2"}.get(self.head)

    @property
    def prefill_dtype(self) -> torch.dtype:
        return getattr(torch, self.prefill)

    def describe(self) -> str:
        return (f"{self.isa}: 4-bit linears on {self.q4}, Q8_0 linears on {self.q8}, output head on {self.head}, "
                f"prefill in {self.prefill}")


def kernel_plan(isa: str | None = None, native: bool | None = None) -> KernelPlan:
    """The plan for `isa` (default: `cpu_isa()`); `native` says whether Lagoon's own kernels may be
    planned (default: whether their library builds and loads, see `lagoon.engine.cpu_kernels`)."""
    isa = isa or cpu_isa()
    avx512 = isa == "avx512"
    if native is None:
        from lagoon.engine import cpu_kernels

        native = isa != "default" and cpu_kernels.available()
    q4 = "int4pack" if avx512 else "int8pack"
    if native and isa != "default":
        from lagoon.engine import cpu_kernels

        vnni = avx512 and cpu_kernels.cpu_has("avx512")  # torch's AVX-512 level does not imply VNNI
        q4 = "q8act_vnni" if vnni else "q8act_avx2"
    return KernelPlan(isa=isa, q4=q4, q8="int4pack_x2" if avx512 else "int8pack",
                      head=q4 if q4.startswith("q8act") else "int8pack",
                      prefill="bfloat16" if avx512 else "float32")
