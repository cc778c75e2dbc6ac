"""`int8`: weight-only int8, bf16 activations; group-wise (default) or per output channel.

Group-wise (``group_size`` 32/64/128 along K, chosen per layer like int4; the default, 32): a
Q8_1-like block format, asymmetric: codes c in 0..255 and per (group, channel) a bf16 step s and
centre z with  w = (c − 128)·s + z.  There is no int8 kernel with group scales in torch, so the
codes are split into nibbles, c = 16·h + l, each packed in the int4 CPU kernel's layout, and

    x·wᵀ = int4mm(x, h; scale 16·s, zero z) + int4mm(x, l; scale s, zero 8·s)

(the int4 kernel computes (q − 8)·scale + zero per group): two `_weight_int4pack_mm_for_cpu` calls,
exact up to the kernel's fp32 accumulation and bf16 output, one byte a weight plus 4 bytes a group.
Cost (1 thread, AVX-512 CPU): decode ~2x `_weight_int8pack_mm`'s time, still faster than fp32
(4096², M=1: 1.5-1.8 vs 0.8 vs 3-8 ms); prefill ~2x int8pack's and 3-5x fp32's (M=256: 0.2-0.6 s vs
0.12 s), at every M (there is no fp32 path: the packed codes are opaque). Where prefill speed
matters more than fidelity, `--group-size 0` gives per-channel scales.
Stored: ``packed_hi``, ``packed_lo`` [N, K/2] uint8 and ``scales_and_zeros`` [K/gs, N, 2] (16·s, z).
Why groups: on the embedded SmolLM2 per-channel int8 keeps 96.6% of top-1 tokens, groups of 32
keep 99% (its weights come from a Q4_1 file with 32-blocks: codes 17·q hold that grid up to the
bf16 rounding of step and centre, < 1/25 of a 4-bit step). On a float source groups still beat
per-channel scales wherever a row has outliers.

Per output channel (``group_size`` 0; also the fallback for a K no group size divides):
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

from lagoon.quant.int4 import pack_int4, unpack_int4
from lagoon.quant.linear import ActivationArgs, WeightScheme

__all__ = [
    "Int8WeightOnly", "quantize_per_channel_int8", "quantize_groups_int8", "CPU_AVX512", "FP32_GEMM_MIN_M", "use_fp32_gemm",
    "int8pack_fits",
]

CPU_AVX512 = torch.backends.cpu.get_cpu_capability().startswith("AVX512")
"""Whether this CPU has AVX-512 (the int8 / bf16 kernels' fast paths)."""

FP32_GEMM_MIN_M = 32
"""Token count from which CPUs without AVX-512 take the fp32 BLAS on a converted weight."""


def use_fp32_gemm(m: int, device: torch.device) -> bool:
    """Whether M tokens on `device` go through the fp32 BLAS (see the module docstring)."""
    return device.type == "cpu" and not CPU_AVX512 and m >= FP32_GEMM_MIN_M


INT8PACK_K_MULTIPLE = 32
"""`torch._weight_int8pack_mm`'s CPU kernel reads K in vector-wide blocks with no tail: on torch 2.13
K = 24 or 40 gives wrong numbers or a segfault (16 and 48 happen to work on AVX-512). Only K that are
multiples of 32 go to it; other widths take the fp32 path on the dequantized weight."""


def int8pack_fits(k: int) -> bool:
    """Whether a K-wide int8 weight may go through `torch._weight_int8pack_mm` (see above)."""
    return k % INT8PACK_K_MULTIPLE == 0


def quantize_per_channel_int8(w: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (q [N, K] int8, scale [N] in `scale_dtype`), symmetric, absmax / 127."""
    scale = (w.abs().amax(dim=1).float().clamp_min(1e-8) / 127.0).to(scale_dtype)  # [N]
    q = torch.round(w.float() / scale.float().unsqueeze(1)).clamp_(-127, 127).to(torch.int8)  # [N, K]
    return q, scale


def quantize_groups_int8(w: torch.Tensor, group_size: int) -> dict[str, torch.Tensor]:
    """w [N, K] float -> the group-wise tensors (see the module docstring)."""
    n, k = w.shape
    g = k // group_size
    wg = w.float().reshape(n, g, group_size)  # [N, G, gs]
    lo, hi = wg.amin(-1), wg.amax(-1)  # [N, G]
    exact = ((hi - lo) / 255.0).clamp_min(1e-8)
    step = exact.to(torch.bfloat16)  # x16 stays exact in bf16
    # the centre from the unrounded step: the step's bf16 error then grows from the middle code
    # outwards (<= 128 x 2^-9 steps at the ends) instead of from code 0 (255 x 2^-9)
    centre = (lo + 128.0 * exact).to(torch.bfloat16)
    s, z = step.float().unsqueeze(-1), centre.float().unsqueeze(-1)
    codes = torch.round((wg - z) / s + 128.0).clamp_(0, 255).to(torch.int32).reshape(n, k)  # [N, K]
    sz = torch.stack([step * 16, centre], dim=-1).transpose(0, 1).contiguous()  # [G, N, 2]
    return {"packed_hi": pack_int4(codes >> 4), "packed_lo": pack_int4(codes & 15), "scales_and_zeros": sz}


def _low_scales(sz: torch.Tensor) -> torch.Tensor:
    """The low nibble's (scale s, zero 8·s) from the stored (16·s, z) — exact in bf16."""
    s = sz[..., 0] / 16
    return torch.stack([s, s * 8], dim=-1)


class Int8WeightOnly(WeightScheme):
    name = "int8"
    GROUP_SIZES = (32, 64, 128)
    DEFAULT_GROUP_SIZE = 32
    PER_CHANNEL = True

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.group_size:
            return quantize_groups_int8(w, self.group_size)
        q, scale = quantize_per_channel_int8(w, torch.bfloat16)
        return {"qweight": q, "scale": scale}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        if "qweight" in t:
            return t["qweight"].float() * t["scale"].float().unsqueeze(1)  # [N, K]
        gs, sz = self.group_size, t["scales_and_zeros"]
        n, k = t["packed_hi"].shape[0], t["packed_hi"].shape[1] * 2
        codes = (unpack_int4(t["packed_hi"], gs).float() * 16 + unpack_int4(t["packed_lo"], gs).float()).reshape(n, k // gs, gs)
        s = (sz[..., 0].float() / 16).t().unsqueeze(-1)  # [N, G, 1]
        return ((codes - 128.0) * s + sz[..., 1].float().t().unsqueeze(-1)).reshape(n, k)

    def dequantize_activation(self, x: torch.Tensor, act: ActivationArgs) -> torch.Tensor:
        return x.to(torch.bfloat16)

    def matmul(self, x: torch.Tensor, t: dict[str, torch.Tensor], act: ActivationArgs) -> tuple[torch.Tensor, str, int]:
        if "packed_hi" in t:
            xb, gs, sz = x.to(torch.bfloat16).contiguous(), self.group_size, t["scales_and_zeros"]
            hi = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t["packed_hi"], gs, sz)  # [M, N] bf16
            lo = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t["packed_lo"], gs, _low_scales(sz))
            return hi.float() + lo.float(), "int4pack_x2", 0
        if use_fp32_gemm(x.shape[0], x.device) or not int8pack_fits(x.shape[-1]):
            xb = x.to(torch.bfloat16).float()  # the scheme's activation rounding
            y = (xb @ t["qweight"].float().t()) * t["scale"].float().unsqueeze(0)  # [M, N]
            return y, "fp32_gemm", 0
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), t["qweight"], t["scale"])  # [M, N] bf16
        return y, "int8pack", 0
