"""Kernel choice by CPU features (`lagoon.engine.kernels`) and the low-bit GGUF linears it picks,
each against the float reference of the same file on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from lagoon.engine.checkpoint import dequant_q4_0, load_gguf, q4_0_fields
from lagoon.engine.gguf_linear import Int8Linear, Q4_1Linear, Q4ActLinear, Q8ActLinear
from lagoon.engine.kernels import cpu_isa, kernel_plan
from lagoon.errors import ConfigError


def test_isa_is_forceable(monkeypatch):
    monkeypatch.delenv("LAGOON_CPU_ISA", raising=False)
    cap = torch.backends.cpu.get_cpu_capability()
    assert cpu_isa() == ("avx512" if cap.startswith("AVX512") else "avx2" if cap.startswith("AVX2") else "default")
    monkeypatch.setenv("LAGOON_CPU_ISA", "avx2")
    assert cpu_isa() == "avx2" and kernel_plan(native=False).q4 == "int8pack"
    assert kernel_plan(native=True).q4 == "q8act_avx2" and kernel_plan(native=True).q4_isa == "avx2"
    assert kernel_plan(native=True).head_isa == "avx2" and kernel_plan(native=False).head == "int8pack"
    monkeypatch.setenv("LAGOON_CPU_ISA", "AVX512")
    assert kernel_plan(native=False).q4 == "int4pack" and kernel_plan(native=False).q4_isa is None
    monkeypatch.setenv("LAGOON_CPU_ISA", "default")
    assert kernel_plan(native=True).q4 == "int8pack"  # no portable build of Lagoon's kernel is planned
    monkeypatch.setenv("LAGOON_CPU_ISA", "neon9000")
    with pytest.raises(ConfigError, match="LAGOON_CPU_ISA"):
        cpu_isa()


@pytest.fixture(scope="module")
def q4_file(tmp_path_factory):
    from test_gguf import _write_tiny_gguf

    from lagoon.engine.tiny import save_tiny_model

    tmp = tmp_path_factory.mktemp("q4")
    path = tmp / "tiny-q4_1.gguf"
    _write_tiny_gguf(save_tiny_model(tmp / "m", "llama"), path, proj_type="Q4_1")
    return path


@pytest.mark.parametrize("isa,native,linear", [("avx512", False, Q4_1Linear), ("avx2", False, Int8Linear),
                                               ("avx512", True, Q4ActLinear), ("avx2", True, Q4ActLinear)])
def test_plan_picks_the_kernel_and_matches_the_float_file(q4_file, monkeypatch, isa, native, linear):
    from lagoon.engine import cpu_kernels

    if native and not cpu_kernels.cpu_has(isa):
        pytest.skip(f"no {isa} here, or Lagoon's kernels did not build: {cpu_kernels.unavailable_reason()}")
    monkeypatch.setenv("LAGOON_CPU_ISA", isa)
    ref = load_gguf(q4_file, "float32")  # the same 4-bit values, dequantized
    got = load_gguf(q4_file, "native", plan=kernel_plan(native=native))
    proj = got.layers[0].mlp.down_proj  # (gate/up may be joined: fuse_projections)
    assert isinstance(proj, linear) and isinstance(got.lm_head, Q8ActLinear if native else Int8Linear)
    assert proj.dense is not None and proj.dense.dtype == kernel_plan(isa, native).prefill_dtype
    g = torch.Generator().manual_seed(4)
    for n in (6, 24):  # 12 rows: the low-bit kernels; 48 rows: the dense prefill copies
        x = torch.randint(0, 256, (2, n), generator=g)
        with torch.no_grad():
            a, b = ref(x), got(x).float()
        # bf16 activations and KV, bf16 norms / embedding, int8 head (and int8 re-quantization on avx2,
        # or int8 activations on Lagoon's kernel)
        assert float((a - b).norm() / a.norm()) <= 5e-2
        assert bool((a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.9)


@pytest.mark.parametrize("dense", [torch.bfloat16, torch.float32])
def test_dense_prefill_copies_hold_the_kernels_values(dense):
    from test_gguf import _random_q4_1

    from lagoon.engine.checkpoint import q4_1_fields

    g = torch.Generator().manual_seed(7)
    N, K = 64, 96
    fields = q4_1_fields(_random_q4_1(N * K // 32, g))
    low, both = Q4_1Linear(*fields, N, K), Q4_1Linear(*fields, N, K, dense=dense)
    w8 = torch.randn(N, K, generator=g)
    low8, both8 = Int8Linear.from_weight(w8), Int8Linear.from_weight(w8, dense)
    x = torch.randn(40, K, generator=g)  # >= PREFILL_MIN_M rows: the dense path
    for a, b in ((low, both), (low8, both8)):
        ref = a(x).double()  # the low-bit kernel on the same rows
        assert float((b(x).double() - ref).norm() / ref.norm()) <= 1e-2  # bf16 rounding of weights / outputs
        assert torch.equal(b(x[:3]), a(x[:3]))  # few rows: the low-bit kernel itself


def test_int8_linear_matches_its_dequantized_weight():
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 128, generator=g)
    layer = Int8Linear.from_weight(w)
    wd = layer.qweight.float() * layer.scale.float()[:, None]
    assert float((wd - w).abs().max() / w.abs().max()) <= 1 / 254 + 1e-3  # half an int8 step of the row absmax
    x = torch.randn(7, 128, generator=g)
    ref = x.bfloat16().double() @ wd.double().t()
    assert float((layer(x).double() - ref).norm() / ref.norm()) <= 1e-2  # bf16 output rounding


def test_q4_0_fields_match_the_gguf_package():
    import gguf
    import numpy as np

    a = torch.randn(16, 64, generator=torch.Generator().manual_seed(6)).numpy()
    raw = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q4_0)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_0).reshape(-1)
    t = torch.from_numpy(np.ascontiguousarray(raw)).reshape(-1)
    assert np.array_equal(dequant_q4_0(t).numpy(), ref)
    d, m, q = q4_0_fields(t)
    layer = Q4_1Linear(d, m, q, 16, 64)
    x = torch.randn(3, 64)
    y = x.bfloat16().double() @ torch.from_numpy(ref).reshape(16, 64).double().t()
    assert float((layer(x).double() - y).norm() / y.norm()) <= 1e-2  # exact weights; bf16 activations/scales
