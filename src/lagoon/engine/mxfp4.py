"""MXFP4 (OCP microscaling FP4) dequantization, as gpt-oss checkpoints store their experts.

``<name>_blocks [..., G, 16] uint8``: 32 FP4 (E2M1) codes per block, two per byte, low nibble
first; ``<name>_scales [..., G] uint8``: one E8M0 exponent per block (value 2^(s − 127)).
`dequant_mxfp4` returns ``[..., G·32]`` float32 — for gpt-oss that is ``[E, out, in]``, the
row-major layout Lagoon's experts use.

GGUF (ggml type MXFP4) packs the same numbers differently: blocks of 17 bytes, the E8M0 exponent
first, then 16 bytes whose low nibbles are elements 0..15 and high nibbles 16..31 (not interleaved
pairs); `dequant_mxfp4_ggml` reads that form. This module is *not* a native MXFP4 kernel: experts run
dequantized (bf16 under ``precision: native``).
"""

from __future__ import annotations

import torch

from lagoon.errors import CheckpointError

__all__ = ["dequant_mxfp4", "dequant_mxfp4_ggml", "FP4_VALUES"]

FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)


def dequant_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, name: str = "tensor") -> torch.Tensor:
    """blocks [..., G, 16] uint8, scales [..., G] uint8 → [..., G·32] float32."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise CheckpointError(f"{name}: MXFP4 blocks/scales must be uint8, got {blocks.dtype}/{scales.dtype}")
    if blocks.shape[-1] != 16 or tuple(blocks.shape[:-1]) != tuple(scales.shape):
        raise CheckpointError(
            f"{name}: MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)} "
            "(expected blocks [..., G, 16] with scales [..., G]); the checkpoint is corrupt"
        )
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).reshape(*blocks.shape[:-1], 32)  # [..., G, 32]
    values = lut[codes.long()]
    out = torch.ldexp(values, (scales.to(torch.int32) - 127).unsqueeze(-1).float())
    return out.reshape(*blocks.shape[:-2], blocks.shape[-2] * 32)


def dequant_mxfp4_ggml(raw: torch.Tensor) -> torch.Tensor:
    """GGUF MXFP4: raw [bytes] uint8, blocks of 17 = E8M0 exponent e + 16 bytes of codes → [N] f32,
    element j of a block = FP4(code_j) · 2^(e − 127), code_j the low nibble of byte j (j < 16) or
    the high nibble of byte j − 16."""
    b = raw.view(-1, 17)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    out = torch.empty(b.shape[0], 32, dtype=torch.float32)
    for s in range(0, b.shape[0], _CHUNK):  # in chunks: the int64 codes of a whole expert tensor are 8x its f32
        blk = b[s : s + _CHUNK]
        codes = torch.cat([blk[:, 1:] & 0x0F, blk[:, 1:] >> 4], dim=1)  # [nb, 32]
        out[s : s + _CHUNK] = torch.ldexp(lut[codes.long()], blk[:, :1].to(torch.int32) - 127)
    return out.reshape(-1)


_CHUNK = 1 << 16  # blocks (2M values) per step
