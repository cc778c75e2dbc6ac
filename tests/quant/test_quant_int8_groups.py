"""Group-wise int8 (the default int8): two int4-kernel calls on the code nibbles equal the fp64
product on the dequantized weight; groups beat per-channel scales; a 4-bit-grid source is held to a fraction of its step."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lagoon.quant import QuantConfig, get_scheme, quantize_
from lagoon.quant.fidelity import sqnr_db
from lagoon.quant.linear import QuantizedLinear

TIGHT_REL = 4e-3  # the int4 kernel's bf16 output (unit roundoff 2^-9), twice


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def heavy_rows(n: int, k: int, seed: int) -> nn.Linear:
    """Gaussian weights with a few large weights per row: what per-channel scales handle badly."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        w = torch.randn(n, k, generator=g) * 0.05
        w[torch.arange(n), torch.randint(0, k, (n,), generator=g)] *= 40.0
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("gs", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 5, 64])
def test_two_nibble_kernel_matches_reference(gs: int, m: int) -> None:
    lin = heavy_rows(96, 256, seed=gs)
    q = QuantizedLinear.from_float(lin, get_scheme("int8", gs))
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
    y = q(x)
    assert q.path_counts == {"int4pack_x2": 1}
    assert rel(y, q.reference(x)) < TIGHT_REL
    # each weight within half a step (+ the centre's bf16 rounding) of the original
    w, dq = lin.weight.detach(), q.dequantize()
    wg = w.reshape(96, 256 // gs, gs)
    step = (wg.amax(-1) - wg.amin(-1)) / 255  # [N, G]
    bound = (0.5 * step + 2**-8 * wg.abs().amax(-1)).repeat_interleave(gs, dim=1)
    assert bool(((dq - w).abs() <= bound + 1e-7).all())


def test_groups_beat_per_channel_on_outlier_rows() -> None:
    lin = heavy_rows(128, 512, seed=1)
    x = torch.randn(32, 512, generator=torch.Generator().manual_seed(2))
    ref = lin(x).detach()
    per_channel = sqnr_db(ref, QuantizedLinear.from_float(lin, get_scheme("int8", 0))(x))
    grouped = sqnr_db(ref, QuantizedLinear.from_float(lin, get_scheme("int8", 32))(x))
    assert grouped > per_channel + 6.0 and grouped > 40.0


def test_a_q4_1_grid_is_held_exactly() -> None:
    # weights m + d·q (q in 0..15) per block of 32, as a dequantized Q4_1 GGUF holds them: code 17·q
    g = torch.Generator().manual_seed(3)
    n, k = 64, 256
    q4 = torch.randint(0, 16, (n, k), generator=g).float()
    q4[:, ::32], q4[:, 1::32] = 0, 15  # every block spans its full range
    d = torch.rand(n, k // 32, 1, generator=g) * 0.01 + 0.001
    mn = -8 * d
    w = (mn + d * q4.reshape(n, k // 32, 32)).reshape(n, k)
    lin = nn.Linear(k, n, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    q = QuantizedLinear.from_float(lin, get_scheme("int8", 32))
    err = (q.dequantize() - w).abs().reshape(n, k // 32, 32).amax(-1, keepdim=True)  # [N, G, 1]
    # only the bf16 rounding of step and centre remains: < 1/25 of the 4-bit step (an int8 step is 1/17)
    assert bool((err < 0.04 * d).all())
    per_channel = (QuantizedLinear.from_float(lin, get_scheme("int8", 0)).dequantize() - w).abs()
    assert (per_channel.reshape(n, k // 32, 32).amax(-1, keepdim=True) / d).max() > 4 * (err / d).max()


def test_default_int8_is_grouped_and_falls_back_per_channel() -> None:
    model = nn.Sequential(nn.Linear(576, 64), nn.Linear(64, 100), nn.Linear(100, 16), nn.Linear(16, 8))
    quantize_(model, QuantConfig(scheme="int8"))
    # K=100 has no group size; N=100 and N=8 are no multiple of 16 (the int4 layout): per-channel scales
    assert [m.scheme.group_size for m in model] == [32, 0, 0, 0]
    assert "qweight" in dict(model[2].named_buffers()) and "packed_hi" in dict(model[0].named_buffers())
    model = nn.Sequential(nn.Linear(576, 64))
    quantize_(model, QuantConfig(scheme="int8", group_size=0))
    assert model[0].scheme.group_size == 0
