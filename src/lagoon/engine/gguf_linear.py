"""Native 4-bit GGUF linears: `Q4_1Linear` runs a GGUF Q4_1 weight on torch's CPU int4 kernel with
no re-quantization, because Q4_1 maps exactly onto torch's layout:

    Q4_1 (blocks of 32):  w = d·q + m,            q in 0..15
    torch int4 (group g): w = (q − 8)·scale + zero  →  scale = d, zero = m + 8·d, g = 32

The only loss beyond the file's own is bf16 scales and bf16 activations (the kernel's input type).
`swap_q4_1(model, fields)` replaces the named `nn.Linear`s from outside; the model file never
branches on it. This is *not* a general quantizer (that is `lagoon.quant`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["Q4_1Linear", "swap_q4_1", "GROUP"]

GROUP = 32


class Q4_1Linear(nn.Module):
    def __init__(self, d: torch.Tensor, m: torch.Tensor, q: torch.Tensor, out_features: int, in_features: int) -> None:
        # d, m [N*K/32, 1] f32; q [N*K/32, 32] uint8 (row-major blocks of the [N, K] weight)
        super().__init__()
        N, K = out_features, in_features
        self.in_features, self.out_features = K, N
        qi = q.reshape(N, K).to(torch.int32)  # [N, K]
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(qi, 2))
        d = d.reshape(N, K // GROUP)
        m = m.reshape(N, K // GROUP)
        sz = torch.stack([d, m + 8 * d], dim=-1).transpose(0, 1).contiguous()  # [K/32, N, 2]
        self.register_buffer("scales_and_zeros", sz.to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).to(torch.bfloat16)  # [M, K]
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, GROUP, self.scales_and_zeros)  # [M, N]
        return y.reshape(*shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, gguf=Q4_1"


def swap_q4_1(model: nn.Module, fields: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> int:
    """Replace each `nn.Linear` whose weight name is in `fields` ({'layers.0.mlp.up_proj.weight':
    (d, m, q)}) by a `Q4_1Linear`; returns how many were swapped."""
    n = 0
    for name, (d, m, q) in fields.items():
        path = name.removesuffix(".weight").split(".")
        parent = model.get_submodule(".".join(path[:-1]))
        old = getattr(parent, path[-1])
        if not isinstance(old, nn.Linear) or old.bias is not None or old.in_features % GROUP:
            continue
        setattr(parent, path[-1], Q4_1Linear(d, m, q, old.out_features, old.in_features))
        n += 1
    return n
