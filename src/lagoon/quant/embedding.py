"""`QuantizedEmbedding`: an `nn.Embedding` with int8 rows (symmetric, one scale per row).

Lookups gather int8 rows and dequantize only those: qweight [V, D] int8, scale [V] fp32. Used when
`QuantConfig.include_embeddings` is set; any weight scheme maps to this one int8 row format
(embeddings are gathered, not multiplied, so the matmul kernels do not apply).
"""

from __future__ import annotations

import torch
from torch import nn

from lagoon.quant.int8 import quantize_per_channel_int8

__all__ = ["QuantizedEmbedding"]


class QuantizedEmbedding(nn.Module):
    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = qweight.shape
        self.out_dtype = dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scale", scale)

    @classmethod
    def from_float(cls, emb: nn.Embedding) -> QuantizedEmbedding:
        q, scale = quantize_per_channel_int8(emb.weight.detach(), torch.float32)  # [V, D], [V]
        return cls(q, scale, emb.weight.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.qweight.float() * self.scale.unsqueeze(1)

    def weight_bytes(self) -> int:
        return self.qweight.numel() + self.scale.numel() * 4

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.qweight[ids].float() * self.scale[ids].unsqueeze(-1)  # [..., D]
        return rows.to(self.out_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"
