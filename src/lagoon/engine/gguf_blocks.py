"""GGUF block formats decoded, vectorised, into what Lagoon's weight-only kernels take.

4-bit formats become *fields* in Q4_1's form, one (d, m) pair per group of 32 consecutive weights
of a row, so `gguf_linear.Q4_1Linear` runs them on torch's int4 kernel (group 32) exactly:

    Q4_0  (blocks of 32):   w = d·(q − 8)             → d,        m = −8·d
    Q4_1  (blocks of 32):   w = d·q + m               → d,        m
    Q4_K  (super-blocks of 256 = 8 sub-blocks of 32, 6-bit scale sc and min mn per sub-block,
           f16 d and dmin per super-block):
                            w = d·sc·q − dmin·mn      → d·sc,     m = −dmin·mn

Q8_0 (w = d·q, q int8, blocks of 32) becomes fields (d, q) that `gguf_linear.Q8Linear` runs exactly
as two int4 passes over the nibbles of q + 128 (on AVX-512; `lagoon.engine.kernels`).
`_weight_int8pack_mm` takes one scale per output channel while these files scale every block of 16
or 32 weights, so the other formats (Q5_0, Q5_1, Q2_K, Q3_K, Q5_K, Q6_K; Q8_0 on AVX2) run
re-quantized to int8 per output channel from their dequantized values (`INT8_KINDS`; the 2-3-bit
K-quants too: int8 is the faster kernel than a bf16 copy), which costs at most half of that
channel's int8 step (max|w_row| / 254) on top of the file's own rounding: about a quarter of Q5's
own step and half of Q6_K's, but about Q8_0's whole step (measured: +0.8% relative weight error on
Q8_0's own 0.55%, hence Q8Linear at about twice int8's decode time; Q6_K's 16-weight sub-blocks fit
no group of 32, and Q5 is kept on the single faster int8 kernel).
Everything here works on whole tensors (no Python loop over blocks). This module does not choose kernels (`lagoon.engine.kernels`) or read files
(`lagoon.engine.checkpoint`).
"""

from __future__ import annotations

import torch

__all__ = ["q4_k_fields", "dequant_q4_k", "q8_0_fields", "INT8_KINDS", "QK_K", "q4_0_fields", "q4_1_fields",
           "dequant_q4_0", "dequant_q4_1", "dequant_q8_0"]

QK_K = 256
_Q4_K_BYTES = 2 + 2 + 12 + QK_K // 2  # f16 d, f16 dmin, 12 bytes of 6-bit scales/mins, 128 of nibbles
INT8_KINDS = ("Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q5_K", "Q6_K")
"""GGUF types whose linears run re-quantized to int8 per output channel at `native` precision."""


def _f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).float()  # [nb, 2] uint8 -> [nb, 1] f32


def _q4_k_scales(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # s [nb, 12] uint8: bytes 0-3 hold sc[0:4] (low 6 bits) and sc[4:8]'s top 2 bits, bytes 4-7
    # mn[0:4] and mn[4:8]'s top 2 bits, bytes 8-11 the low nibbles of sc[4:8] (low) / mn[4:8] (high)
    a, b, c = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], dim=1)  # [nb, 8]
    mn = torch.cat([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], dim=1)  # [nb, 8]
    return sc, mn


def q4_k_fields(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_K super-blocks of 144 bytes → d [nb·8, 1], m [nb·8, 1], q [nb·8, 32] uint8 in 0..15,
    one row per sub-block of 32 in the weight's row-major order (w = d·q + m)."""
    b = raw.view(-1, _Q4_K_BYTES)
    nb = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])  # [nb, 1]
    sc, mn = _q4_k_scales(b[:, 4:16])
    qs = b[:, 16:].reshape(nb, 4, 1, 32)  # 4 chunks of 32 bytes: low nibbles are sub-block 2i, high 2i+1
    q = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(nb * 8, 32)  # [nb·8, 32]
    scale = (d * sc.float()).reshape(-1, 1)
    zero = (-dmin * mn.float()).reshape(-1, 1)
    return scale, zero, q


def dequant_q4_k(raw: torch.Tensor) -> torch.Tensor:
    d, m, q = q4_k_fields(raw)
    return (d * q.float() + m).reshape(-1)


def q8_0_fields(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q8_0 blocks of 34 bytes = f16 d + 32 int8 q → d [nb, 1] f32, m = 0 [nb, 1], q [nb, 32]
    int8 (w = d·q + m, the shape of the 4-bit fields so the same row un-permutation applies)."""
    b = raw.view(-1, 34)
    d = _f16(b[:, 0:2])
    return d, torch.zeros_like(d), b[:, 2:].contiguous().view(torch.int8)


def dequant_q8_0(raw: torch.Tensor) -> torch.Tensor:
    """GGUF Q8_0: blocks of 34 bytes = f16 scale d + 32 int8 q; w = d·q. raw [bytes] uint8 → [N] f32."""
    b = raw.view(-1, 34)
    d = b[:, :2].contiguous().view(torch.float16).float()  # [nb, 1]
    q = b[:, 2:].contiguous().view(torch.int8).float()  # [nb, 32]
    return (d * q).reshape(-1)


def q4_1_fields(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_1 blocks of 20 bytes = f16 d, f16 m, 16 bytes of nibbles (low nibbles are values
    0..15, high nibbles 16..31) → d [nb, 1], m [nb, 1], q [nb, 32] uint8 in 0..15."""
    b = raw.view(-1, 20)
    d = b[:, 0:2].contiguous().view(torch.float16).float()
    m = b[:, 2:4].contiguous().view(torch.float16).float()
    packed = b[:, 4:]
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1)  # [nb, 32]
    return d, m, q


def dequant_q4_1(raw: torch.Tensor) -> torch.Tensor:
    d, m, q = q4_1_fields(raw)
    return (d * q.float() + m).reshape(-1)


def q4_0_fields(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF Q4_0 blocks of 18 bytes = f16 d, 16 bytes of nibbles; w = d·(q − 8), returned in Q4_1's
    form d [nb, 1], m = −8·d [nb, 1], q [nb, 32] uint8 in 0..15."""
    b = raw.view(-1, 18)
    d = b[:, 0:2].contiguous().view(torch.float16).float()
    packed = b[:, 2:]
    q = torch.cat([packed & 0x0F, packed >> 4], dim=1)  # [nb, 32]
    return d, -8.0 * d, q


def dequant_q4_0(raw: torch.Tensor) -> torch.Tensor:
    d, m, q = q4_0_fields(raw)
    return (d * q.float() + m).reshape(-1)
