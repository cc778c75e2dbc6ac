"""`bf16`: weights stored in bfloat16, activations rounded to bfloat16, fp32 accumulation by the
BLAS. The `BF16` profile; not a quantizer in the integer sense, but it shares the swap, save and
fidelity machinery so the profile table has one code path.
"""

from __future__ import annotations

import torch

from lagoon.quant.linear import ActivationArgs, WeightScheme

__all__ = ["Bf16Weights"]


class Bf16Weights(WeightScheme):
    name = "bf16"

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"qweight": w.to(torch.bfloat16).contiguous()}

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        return t["qweight"].float()

    def dequantize_activation(self, x: torch.Tensor, act: ActivationArgs) -> torch.Tensor:
        return x.to(torch.bfloat16)

    def matmul(self, x: torch.Tensor, t: dict[str, torch.Tensor], act: ActivationArgs) -> tuple[torch.Tensor, str, int]:
        return x.to(torch.bfloat16) @ t["qweight"].t(), "bf16", 0
