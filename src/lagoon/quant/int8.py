"""`int8`: weight-only int8, symmetric per output channel, bf16 activations.

w ≈ q · scale, q int8 in [-127, 127] stored [N, K], scale [N] in bf16 (the kernel's dtype, so the
reference dequantizes with exactly the scale the kernel uses). The matmul is
`torch._weight_int8pack_mm(x_bf16 [M, K], q [N, K], scale [N])`; it needs bf16 activations (fp32
ones are 18-130x slower here), so activations are rounded to bf16 — that rounding is part of the
scheme and of its reference. Not activation-quantized: see `w8a8` for that.
"""

from __future__ import annotations

import torch

from lagoon.quant.linear import ActivationArgs, WeightScheme

__all__ = ["Int8WeightOnly", "quantize_per_channel_int8"]


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
        y = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), t["qweight"], t["scale"])  # [M, N] bf16
        return y, "int8pack", 0
