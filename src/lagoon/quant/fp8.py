"""`fp8`: float8 e4m3 weights per output channel, per-token dynamic e4m3 activations.

Weights: qweight [N, K] float8_e4m3fn, scale [N] fp32 (absmax / 448, the e4m3 maximum; casts
saturate at ±448). Activations: one scale per token from the token-type policy, absmax / 448.

On CUDA the product is `torch._scaled_mm(xq, q.t(), scale_a, scale_b)` (path "scaled_mm"). This CPU
has no fast fp8 path (`_scaled_mm` here takes ~86 ms for 4096²), so on CPU the fp8 operands are
upcast to bf16 — exact, since e4m3 values fit in bf16 — and multiplied by the bf16 BLAS (path
"fp8_upcast"): the numerics are fp8's, the speed is bf16's minus the upcast. fp8 here saves memory,
not time.
"""

from __future__ import annotations

import torch

from lagoon.quant.linear import ActivationArgs, WeightScheme

__all__ = ["Fp8"]

E4M3_MAX = 448.0
_F8 = torch.float8_e4m3fn


class Fp8(WeightScheme):
    name = "fp8"
    activation_quantized = True

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        scale = w.abs().amax(dim=1).float().clamp_min(1e-8) / E4M3_MAX  # [N]
        q = (w.float() / scale.unsqueeze(1)).clamp_(-E4M3_MAX, E4M3_MAX).to(_F8)  # [N, K]
        return {"qweight": q, "scale": scale}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["qweight"].float() * t["scale"].unsqueeze(1)

    @staticmethod
    def quantize_activation(x: torch.Tensor, act: ActivationArgs) -> tuple[torch.Tensor, torch.Tensor, int]:
        """x [M, K] -> (xq [M, K] e4m3, sx [M, 1] fp32, tokens scaled dynamically)."""
        absmax, dynamic = act.absmax(x)
        sx = absmax / E4M3_MAX
        xq = (x.float() / sx).clamp_(-E4M3_MAX, E4M3_MAX).to(_F8)
        return xq, sx, int(dynamic.sum())

    def dequantize_activation(self, x: torch.Tensor, act: ActivationArgs) -> torch.Tensor:
        xq, sx, _ = self.quantize_activation(x, act)
        return xq.double() * sx.double()

    def matmul(self, x: torch.Tensor, t: dict[str, torch.Tensor], act: ActivationArgs) -> tuple[torch.Tensor, str, int]:
        q, scale = t["qweight"], t["scale"]
        xq, sx, n_dyn = self.quantize_activation(x, act)
        if x.is_cuda:
            y = torch._scaled_mm(xq, q.t(), scale_a=sx, scale_b=scale.unsqueeze(0), out_dtype=torch.bfloat16)
            return y, "scaled_mm", n_dyn
        acc = xq.to(torch.bfloat16) @ q.to(torch.bfloat16).t()  # [M, N]
        return acc.float() * sx * scale.unsqueeze(0), "fp8_upcast", n_dyn
