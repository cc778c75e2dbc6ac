"""`int8`: weight-only int8, symmetric per output channel, bf16 activations.

w ≈ q · scale, q int8 in [-127, 127] stored [N, K], scale [N] in bf16 (the kernel's dtype, so the
reference dequantizes with exactly the scale the kernel uses). The matmul is
`torch._weight_int8pack_mm(x_bf16 [M, K], q [N, K], scale [N])`; it needs bf16 activations (fp32
ones are 18-130x slower here), so activations are rounded to bf16 — that rounding is part of the
scheme and of its reference. Not activation-quantized: see `w8a8` for that.

Large M on CPUs without AVX-512 (path "fp32_gemm"): the int8pack kernel and bf16 matmuls have no
fast path there (measured on an AVX2 EPYC, 4096², M=256: fp32 224 ms, int8pack 636 ms, bf16 1087
ms), so from `FP32_GEMM_MIN_M` tokens the int8 weight is converted to fp32 and multiplied by the
fp32 BLAS, the per-channel scale applied to the output. The activations are still rounded to bf16,
so the numbers are the reference's; only the speed differs (about fp32's, plus the conversion).
"""

from __future__ import annotations

import torch

from lagoon.quant.linear import ActivationArgs, WeightScheme

__all__ = ["Int8WeightOnly", "quantize_per_channel_int8", "CPU_AVX512", "FP32_GEMM_MIN_M", "use_fp32_gemm"]

CPU_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
"""Whether this CPU has AVX-512 (the int8 / bf16 kernels' fast paths)."""

FP32_GEMM_MIN_M = 32
"""Token count from which CPUs without AVX-512 take the fp32 BLAS on a converted weight."""


def use_fp32_gemm(m: int, device: torch.device) -> bool:
    """Whether M tokens on `device` go through the fp32 BLAS (see the module docstring)."""
    return device.type == "cpu" and not CPU_AVX512 and m >= FP32_GEMM_MIN_M


def quantize_per_channel_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int8, scale [N] in `scale_dtype`), symmetric, absmax / 127."""
    scale = (w.abs().amax(dim=1).float().clamp_min(1e-8) / 127.0).to(scale_dtype)  # [N]
    q = torch.round(w.float() / scale.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)  # [N, K]
    return q, scale


class Int8WeightOnly(WeightScheme):
    name = "int8"

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quantize_per_channel_int8(w, torch.bfloat16)
        return {"qweight": q, "scale": scale}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["qweight"].float() * t["scale"].float().unsqueeze(1)  # [N, K]

    def dequantize_activation(self, x: torch.Tensor, act: ActivationArgs) -> torch.Tensor:
        return x.to(torch.bfloat16)

    def matmul(self, x: torch.Tensor, t: dict[str, torch.Tensor], act: ActivationArgs) -> tuple[torch.Tensor, str, int]:
        if use_fp32_gemm(x.shape[0], x.device):
            xb = x.to(torch.bfloat16).float()  # the scheme's activation rounding
            y = (xb @ t["qweight"].float().t()) * t["scale"].float().unsqueeze(0)  # [M, N]
            return y, "fp32_gemm", 0
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), t["qweight"], t["scale"])  # [M, N] bf16
        return y, "int8pack", 0
