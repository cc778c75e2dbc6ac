"""`int4`: weight-only 4-bit, asymmetric, group-wise along K (group 32, 64 or 128), bf16 activations.

The group size is chosen per layer by `quantize_` (the largest of 128/64/32 not above the
configured one that divides K: with 128, 576-wide layers get 64) and recorded per module in the
checkpoint. The default is 32: on the embedded SmolLM2 (held-out text vs fp32) 128-by-K groups keep
67.7% of top-1 tokens, 32-groups 97.9%; on an off-grid float source 60.0% vs 68.8%.

Layout is the one torch's CPU kernel defines: codes q in 0..15 per weight, and per (group, channel)
a bf16 scale and zero with  w = (q - 8) · scale + zero.  `scales_and_zeros` is [K/gs, N, 2];
the codes are packed by `torch.ops.aten._convert_weight_to_int4pack_for_cpu` into an opaque
[N, K/2] uint8 tensor (two codes a byte, in the kernel's own order), and the matmul is
`torch.ops.aten._weight_int4pack_mm_for_cpu(x_bf16 [M, K], packed, gs, scales_and_zeros)`.

Because the packed order is the kernel's, a saved int4 checkpoint records the layout
(`LAYOUT`) and is only loaded where the same layout is available. `unpack_int4` recovers the codes
exactly by running the kernel on an identity matrix with unit scales (used by `dequantize`, tests
and fidelity; it costs one K x K x N matmul, so it is not on the forward path).

Not for CUDA: the CUDA int4 kernel wants a different (tiled) packing.
"""

from __future__ import annotations

import torch

from lagoon.errors import QuantizationError
from lagoon.quant.linear import ActivationArgs, WeightScheme

__all__ = ["Int4WeightOnly", "pack_int4", "unpack_int4", "GROUP_SIZES", "LAYOUT"]

GROUP_SIZES = (32, 64, 128)
LAYOUT = "aten_int4pack_cpu"


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] ints in 0..15 -> packed [N, K/2] uint8 in the CPU kernel's order."""
    if codes.min() < 0 or codes.max() > 15:
        raise QuantizationError("int4 codes must lie in 0..15")
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)


def unpack_int4(packed: torch.Tensor, group_size: int) -> torch.Tensor:
    """Inverse of `pack_int4`: packed [N, K/2] -> codes [N, K] uint8 (exact)."""
    n, k = packed.shape[0], packed.shape[1] * 2
    # scale 1, zero 0 -> the kernel returns (q - 8), small integers that bf16 holds exactly
    unit = torch.zeros(k // group_size, n, 2, dtype=torch.bfloat16)
    unit[..., 0] = 1.0
    out = torch.empty(n, k, dtype=torch.uint8)
    eye = torch.eye(k, dtype=torch.bfloat16)
    step = 1024
    for k0 in range(0, k, step):
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(eye[k0 : k0 + step], packed, group_size, unit)  # [s, N]
        out[:, k0 : k0 + step] = (y.float().round() + 8).t().to(torch.uint8)
    return out


class Int4WeightOnly(WeightScheme):
    name = "int4"
    GROUP_SIZES = GROUP_SIZES
    DEFAULT_GROUP_SIZE = 32  # measured: g128/64 keep 67.7% top-1 on the embedded model, g32 97.9%

    def __init__(self, group_size: int = 128) -> None:
        if group_size not in GROUP_SIZES:
            raise QuantizationError(f"int4 group_size {group_size} is not supported; use one of {GROUP_SIZES}")
        super().__init__(group_size)

    def quantize(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        n, k = w.shape
        gs = self.group_size
        if k % gs:
            raise QuantizationError(
                f"int4 needs in_features divisible by group_size; {k} % {gs} != 0 (quantize_ picks a fitting "
                "group size per layer; call the scheme with one of those, or leave this layer out with --keep)"
            )
        wg = w.float().reshape(n, k // gs, gs)  # [N, G, gs]
        scale, zero = self.grid(wg)
        return self.encode(self.codes(wg, scale, zero).reshape(n, k), scale, zero)

    @staticmethod
    def grid(wg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Groups [..., gs] -> bf16 (scale, zero) [...] spanning each group's min..max."""
        lo, hi = wg.float().amin(-1), wg.float().amax(-1)
        scale = ((hi - lo) / 15.0).clamp_min(1e-8).to(torch.bfloat16)
        zero = (lo + 8.0 * scale.float()).to(torch.bfloat16)  # w = (q - 8)·scale + zero, q = 0 at lo
        return scale, zero

    @staticmethod
    def codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
        """Round groups [..., gs] to codes 0..15 on the grid (scale, zero) [...]."""
        return torch.round((wg.float() - zero.float().unsqueeze(-1)) / scale.float().unsqueeze(-1) + 8.0).clamp_(0, 15)

    def encode(self, codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> dict[str, torch.Tensor]:
        """codes [N, K] on grids (scale, zero) [N, G] -> the stored tensors (GPTQ sets codes itself)."""
        sz = torch.stack([scale.to(torch.bfloat16), zero.to(torch.bfloat16)], dim=-1).transpose(0, 1).contiguous()
        return {"packed": pack_int4(codes), "scales_and_zeros": sz}  # [N, K/2], [G, N, 2]

    def dequantize(self, t: dict[str, torch.Tensor]) -> torch.Tensor:
        packed, sz = t["packed"], t["scales_and_zeros"]
        n, k = packed.shape[0], packed.shape[1] * 2
        gs = self.group_size
        codes = unpack_int4(packed, gs).float().reshape(n, k // gs, gs)  # [N, G, gs]
        scale = sz[..., 0].float().t().unsqueeze(-1)  # [N, G, 1]
        zero = sz[..., 1].float().t().unsqueeze(-1)
        return ((codes - 8.0) * scale + zero).reshape(n, k)

    def dequantize_activation(self, x: torch.Tensor, act: ActivationArgs) -> torch.Tensor:
        return x.to(torch.bfloat16)

    def matmul(self, x: torch.Tensor, t: dict[str, torch.Tensor], act: ActivationArgs) -> tuple[torch.Tensor, str, int]:
        xb = x.to(torch.bfloat16).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, t["packed"], self.group_size, t["scales_and_zeros"])
        return y, "int4pack", 0
