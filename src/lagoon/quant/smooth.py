"""SmoothQuant: move activation outliers into the weights before w8a8 / fp8 quantization.

A few input channels of a linear layer carry activations far larger than the rest, so one
per-token int8 scale spends its levels on them and rounds the other channels coarsely. With a
per-input-channel factor ``s [K]``:

    y = x · Wᵀ = (x / s) · (W · s)ᵀ

the activation ``x / s`` is flatter and the weight ``W · s`` takes the outliers, where per-channel
weight scales absorb them well. ``s_j = max|x_j|^α / max|W_j|^(1-α)`` from calibration
(Xiao et al., 2023); α = 0.5 balances the two, larger α moves more of the range into the weight.

`QuantizedLinear` keeps ``s`` as its ``smooth`` buffer and divides its input by it (one
elementwise op, cheap next to the matmul) instead of folding it into the previous norm, so it
needs no knowledge of the model's structure. Used only for activation-quantized schemes and only
with a calibration (the factors come from measured channel ranges). Not for stacked MoE experts
(their channels are shared by experts with different weights; they keep plain per-token scales).
"""

from __future__ import annotations

import torch

__all__ = ["smoothing_factors", "S_MIN", "S_MAX"]

S_MIN, S_MAX = 1e-2, 1e2
"""Clamp on the factors, so a dead channel or a tiny weight column cannot blow a factor up."""


def smoothing_factors(channel_absmax: torch.Tensor, weight: torch.Tensor, alpha: float) -> torch.Tensor:
    """Per-input-channel factors ``s [K]`` from activation ranges ([K], or [types, K] with NaN for
    unseen types, pooled by max) and the weight ``[N, K]``. Channels never seen get s = 1."""
    a = channel_absmax.float()
    if a.dim() == 2:
        a = torch.where(torch.isnan(a), torch.zeros_like(a), a).amax(0)  # [K]
    w = weight.detach().float().abs().amax(0)  # [K]
    s = a.clamp_min(1e-5).pow(alpha) / w.clamp_min(1e-5).pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(S_MIN, S_MAX)
