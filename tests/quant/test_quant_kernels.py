"""Every scheme's Linear against an fp64 reference on its dequantized operands (tight) and against
the original float weights (a scheme-appropriate SQNR bound), on fresh random inputs."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lagoon.errors import QuantizationError
from lagoon.quant import SCHEMES, get_scheme
from lagoon.quant.fidelity import sqnr_db
from lagoon.quant.int4 import pack_int4, unpack_int4
from lagoon.quant.linear import QuantizedLinear
from lagoon.quant.w8a8 import INT_MM_FAST_CPU, W8A8, use_int_mm

# bf16 output rounding (unit roundoff 2^-9) bounds the gap to the fp64 oracle on the same operands
TIGHT_REL = 4e-3
# SQNR (dB) against the float weights on Gaussian weights and inputs (the hardest case for int4)
MIN_SQNR = {"bf16": 45.0, "int8": 40.0, "w8a8": 36.0, "fp8": 26.0, "int4": 20.0}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture
def linear() -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(256, 192, bias=True)


@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("m", [1, 7, 48])
def test_kernel_matches_fp64_reference(linear: nn.Linear, scheme: str, m: int) -> None:
    q = QuantizedLinear.from_float(linear, get_scheme(scheme, 64))
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m))
    y = q(x)
    assert y.shape == (m, 192) and y.dtype == torch.float32
    assert rel(y, q.reference(x)) < TIGHT_REL
    assert sqnr_db(linear(x).detach(), y) > MIN_SQNR[scheme]


@pytest.mark.parametrize("gs,min_db", [(32, 24.0), (64, 22.0), (128, 20.0)])
def test_int4_group_sizes_order_error(linear: nn.Linear, gs: int, min_db: float) -> None:
    q = QuantizedLinear.from_float(linear, get_scheme("int4", gs))
    x = torch.randn(16, 256)
    assert sqnr_db(linear(x).detach(), q(x)) > min_db
    assert rel(q(x), q.reference(x)) < TIGHT_REL


def test_leading_dims_and_bias_kept(linear: nn.Linear) -> None:
    q = QuantizedLinear.from_float(linear, get_scheme("int8"))
    x = torch.randn(2, 3, 256)
    assert q(x).shape == (2, 3, 192)
    assert rel(q(x), q.reference(x)) < TIGHT_REL


def test_w8a8_kernel_choice_by_token_count(linear: nn.Linear) -> None:
    q = QuantizedLinear.from_float(linear, get_scheme("w8a8"))
    for m in (1, 2, 16, 17, 64):
        q(torch.randn(m, 256))
    # _int_mm only outside the 2..16 floor band, and only where the CPU has a fast int8 path; without
    # one, prefill-sized calls (>= FP32_GEMM_MIN_M = 32 tokens) take the fp32 BLAS
    want = {"int_mm": 3, "int8pack_a8": 2} if INT_MM_FAST_CPU else {"int8pack_a8": 4, "fp32_gemm": 1}
    assert q.path_counts == want
    assert [use_int_mm(m, torch.device("cuda")) for m in (1, 2, 16, 17)] == [True, False, False, True]


def test_w8a8_paths_agree_on_quantized_operands(linear: nn.Linear) -> None:
    q = QuantizedLinear.from_float(linear, get_scheme("w8a8"))
    x = torch.randn(32, 256)
    t, act = q.tensors, q.act_args(32)
    xq, sx, _ = W8A8.quantize_activation(x, act)
    exact = torch._int_mm(xq, t["qweight"].t()).double() * sx.double() * t["scale"].double()  # int32: exact
    assert rel(exact, q.reference(x) - q.bias.double()) < 1e-6
    assert rel(q(x), q.reference(x)) < TIGHT_REL


@pytest.mark.parametrize("gs", [32, 64, 128])
def test_int4_pack_round_trip(gs: int) -> None:
    g = torch.Generator().manual_seed(gs)
    codes = torch.randint(0, 16, (48, 256), generator=g)
    assert torch.equal(unpack_int4(pack_int4(codes), gs), codes.to(torch.uint8))


def test_int4_dequantize_matches_weight_within_half_step(linear: nn.Linear) -> None:
    s = get_scheme("int4", 32)
    t = s.quantize(linear.weight.detach())
    w = linear.weight.detach().reshape(192, 8, 32)
    step = (w.amax(-1) - w.amin(-1)) / 15  # [N, G]
    err = (s.dequantize(t).reshape(192, 8, 32) - w).abs().amax(-1)
    assert bool((err <= 0.5 * step * 1.02 + 1e-3).all())


def test_bad_inputs_name_the_fix(linear: nn.Linear) -> None:
    with pytest.raises(QuantizationError, match="valid: int8, w8a8, int4, fp8"):
        get_scheme("int3")
    with pytest.raises(QuantizationError, match="32, 64, 128"):
        get_scheme("int4", 48)
    with pytest.raises(QuantizationError, match="divisible by group_size"):
        get_scheme("int4", 128).quantize(torch.randn(8, 96))
    with pytest.raises(QuantizationError, match="0..15"):
        pack_int4(torch.full((8, 64), 16))


def test_weight_bytes_shrink(linear: nn.Linear) -> None:
    fp32 = 256 * 192 * 4
    got = {s: QuantizedLinear.from_float(linear, get_scheme(s, 128)).weight_bytes() for s in ("int8", "int4", "fp8")}
    assert got["int8"] < fp32 / 3.5 and got["fp8"] < fp32 / 3.5 and got["int4"] < fp32 / 6


@pytest.mark.parametrize("scheme", ["int8", "w8a8"])
@pytest.mark.parametrize("avx512", [False, True])
def test_prefill_fp32_gemm_path_matches_reference(linear: nn.Linear, scheme: str, avx512: bool, monkeypatch) -> None:
    import lagoon.quant.int8 as int8_mod

    monkeypatch.setattr(int8_mod, "CPU_AVX512", avx512)  # exercise both CPU kinds' choices on any CPU
    q = QuantizedLinear.from_float(linear, get_scheme(scheme, 0))  # per-channel int8 (grouped: the int4 kernel)
    x = torch.randn(int8_mod.FP32_GEMM_MIN_M, 256, generator=torch.Generator().manual_seed(5))
    y = q(x)
    assert ("fp32_gemm" in q.path_counts) is not avx512
    assert rel(y, q.reference(x)) < TIGHT_REL
    q(x[:4])  # decode-sized calls never take it
    assert q.path_counts.get("fp32_gemm", 0) == (0 if avx512 else 1)


@pytest.mark.parametrize("scheme,gs", [("int8", 0), ("w8a8", 0)])
@pytest.mark.parametrize("k", [24, 40])
@pytest.mark.parametrize("m", [1, 5])
def test_int8_widths_the_int8pack_kernel_cannot_take(scheme: str, gs: int, k: int, m: int) -> None:
    # torch's int8pack kernel segfaults or miscomputes at K = 24 / 40 (experts that narrow exist)
    torch.manual_seed(k)
    q = QuantizedLinear.from_float(nn.Linear(k, 24), get_scheme(scheme, gs))
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    assert rel(q(x), q.reference(x)) < TIGHT_REL


def test_gguf_int8_linear_on_a_narrow_width() -> None:
    from lagoon.engine.gguf_linear import Int8Linear

    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    lin = Int8Linear.from_weight(w)
    x = torch.randn(3, 40, generator=torch.Generator().manual_seed(2))
    deq = lin.qweight.double() * lin.scale.double()[:, None]
    assert rel(lin(x), x.to(torch.bfloat16).double() @ deq.t()) < TIGHT_REL
