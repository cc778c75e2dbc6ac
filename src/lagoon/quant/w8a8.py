"""`w8a8`: int8 weights per output channel and int8 activations per token.

Weights: q [N, K] int8, scale [N] (symmetric absmax / 127, kept in bf16 so every kernel below uses
the same scale). Activations: one scale per token, absmax / 127, where the absmax comes from the
token-type policy (`lagoon.quant.policy`: dynamic for reasoning tokens, calibrated static for
context/tool tokens unless they exceed `dynamic_threshold` x the static range).

    y[m, n] = (Σ_k xq[m, k] · q[n, k]) · sx[m] · scale[n]

Two kernels compute it, chosen per call by token count M and by the CPU:

- "int_mm": `torch._int_mm(xq, q.t())`, exact int32 accumulation. The weight is stored [N, K] and
  passed transposed (much faster at M=1 than a contiguous [K, N]). Used on CUDA, and on CPUs with
  AVX-512 (VNNI) outside 2 <= M <= 16, where `_int_mm` has a ~1 ms floor.
- "int8pack_a8": the int8 activations, exactly representable in bf16, go through
  `torch._weight_int8pack_mm(xq_bf16, q, scale)` (fp32 accumulation, bf16 output), then x sx.
  Same quantized operands, so the same reference; only the output is rounded to bf16. Used in the
  2..16 band and on CPUs without AVX-512, where `_int_mm` has no fast path (measured on an AVX2
  EPYC: 45 ms at M=1 for 4096², 10-60x slower than fp32).
- "fp32_gemm": on CPUs without AVX-512 from `FP32_GEMM_MIN_M` tokens (prefill), where neither int8
  kernel is fast (4096², M=256 on the AVX2 EPYC: `_int_mm` 7.4 s, int8pack 0.7 s, fp32 0.22 s), the
  int8 operands are converted to fp32 and multiplied by the fp32 BLAS. Integer products and sums
  are exact in fp32 up to 2^24, so this is the reference up to fp32 rounding of large sums.
"""

from __future__ import annotations

import torch

from lagoon.quant.int8 import CPU_AVX512, int8pack_fits, quantize_per_channel_int8, use_fp32_gemm
from lagoon.quant.linear import ActivationArgs, WeightScheme

__all__ = ["W8A8", "INT_MM_FLOOR", "INT_MM_FAST_CPU"]

INT_MM_FLOOR = (2, 16)
"""Token counts (inclusive) where `_int_mm` is slow and the int8pack kernel is taken instead."""

INT_MM_FAST_CPU = CPU_AVX512
"""Whether this CPU has the vector int8 instructions `_int_mm` needs to be fast."""


def use_int_mm(m: int, device: torch.device) -> bool:
    """The kernel choice for M tokens on `device` (see the module docstring)."""
    if INT_MM_FLOOR[0] <= m <= INT_MM_FLOOR[1]:
        return False
    return device.type == "cuda" or INT_MM_FAST_CPU


class W8A8(WeightScheme):
    name = "w8a8"
    activation_quantized = True

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quantize_per_channel_int8(w, torch.bfloat16)
        return {"qweight": q, "scale": scale}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["qweight"].float() * t["scale"].float().unsqueeze(1)  # [N, K]

    @staticmethod
    def quantize_activation(x: torch.Tensor, act: ActivationArgs) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x [M, K] -> (xq [M, K] int8, sx [M, 1] fp32, tokens scaled dynamically)."""
        absmax, dynamic = act.absmax(x)
        sx = absmax / 127.0  # [M, 1]
        xq = torch.round(x.float() / sx).clamp_(-127, 127).to(torch.int8)
        return xq, sx, int(dynamic.sum())

    def dequantize_activation(self, x: torch.Tensor, act: ActivationArgs) -> torch.Tensor:
        xq, sx, _ = self.quantize_activation(x, act)
        return xq.double() * sx.double()

    def matmul(self, x: torch.Tensor, t: dict[str, torch.Tensor], act: ActivationArgs) -> tuple[torch.Tensor, str, int]:
        q, scale = t["qweight"], t["scale"]
        xq, sx, n_dyn = self.quantize_activation(x, act)
        if use_fp32_gemm(x.shape[0], x.device) or (not int8pack_fits(x.shape[-1]) and not use_int_mm(x.shape[0], x.device)):
            acc = xq.float() @ q.float().t()  # [M, N], integer-valued
            return acc * sx * scale.float().unsqueeze(0), "fp32_gemm", n_dyn
        if use_int_mm(x.shape[0], x.device):
            acc = torch._int_mm(xq, q.t())  # [M, N] int32, exact
            return acc.float() * sx * scale.float().unsqueeze(0), "int_mm", n_dyn
        y = torch._weight_int8pack_mm(xq.to(torch.bfloat16), q, scale)  # [M, N] bf16, = (xq·qᵀ)·scale
        return y.float() * sx, "int8pack_a8", n_dyn
