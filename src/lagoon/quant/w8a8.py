"""`w8a8`: int8 weights per output channel and int8 activations per token, through `torch._int_mm`.

Weights: q [N, K] int8, scale [N] fp32 (symmetric absmax / 127). The weight is stored [N, K] and
passed as `q.t()`: `_int_mm` is ~7x faster at M=1 with that layout than with a contiguous [K, N].
Activations: one scale per token, absmax / 127, where the absmax comes from the token-type policy
(`lagoon.quant.policy`: dynamic for reasoning tokens, calibrated static for context/tool tokens
unless they exceed `dynamic_threshold` x the static range).

y[m, n] = (Σ_k xq[m, k] · q[n, k]) · sx[m] · scale[n], accumulated exactly in int32.

`_int_mm` has a ~1 ms floor for 2 <= M <= 16 on this CPU (MoE decode with a few tokens per expert),
so in that band the same int8 weight runs through `_weight_int8pack_mm` with bf16 activations
(weight-only numerics, path "int8pack"); elsewhere the path is "int_mm".
"""

from __future__ import annotations

import torch

from lagoon.quant.int8 import quantize_per_channel_int8
from lagoon.quant.linear import ActivationArgs, WeightScheme

__all__ = ["W8A8", "INT_MM_FLOOR"]

INT_MM_FLOOR = (2, 16)
"""Token counts (inclusive) where `_int_mm` is slow and the int8pack path is taken instead."""


def _use_int_mm(m: int) -> bool:
    return not (INT_MM_FLOOR[0] <= m <= INT_MM_FLOOR[1])


class W8A8(WeightScheme):
    name = "w8a8"
    activation_quantized = True

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        q, scale = quantize_per_channel_int8(w, torch.float32)
        return {"qweight": q, "scale": scale}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["qweight"].float() * t["scale"].unsqueeze(1)  # [N, K]

    @staticmethod
    def quantize_activation(x: torch.Tensor, act: ActivationArgs) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x [M, K] -> (xq [M, K] int8, sx [M, 1] fp32, tokens scaled dynamically)."""
        absmax, dynamic = act.absmax(x)
        sx = absmax / 127.0  # [M, 1]
        xq = torch.round(x.float() / sx).clamp_(-127, 127).to(torch.int8)
        return xq, sx, int(dynamic.sum())

    def dequantize_activation(self, x: torch.Tensor, act: ActivationArgs) -> torch.Tensor:
        if not _use_int_mm(x.shape[0]):
            return x.to(torch.bfloat16)
        xq, sx, _ = self.quantize_activation(x, act)
        return xq.double() * sx.double()

    def matmul(self, x: torch.Tensor, t: dict[str, torch.Tensor], act: ActivationArgs) -> tuple[torch.Tensor, str, int]:
        q, scale = t["qweight"], t["scale"]
        if not _use_int_mm(x.shape[0]):
            y = torch._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), q, scale.to(torch.bfloat16))
            return y, "int8pack", 0
        xq, sx, n_dyn = self.quantize_activation(x, act)
        acc = torch._int_mm(xq, q.t())  # [M, N] int32
        return acc.float() * sx * scale.unsqueeze(0), "int_mm", n_dyn
