"""Quantized stacked experts against the fp32 einsum oracle (`lagoon.moe.ReferenceExperts`) and
against the fp64 reference on their own dequantized operands; inside a SparseMoE via quantize_."""

from __future__ import annotations

import pytest
import torch
from quant_models import tiny_lm

from lagoon.moe import ReferenceExperts, SparseMoE, plan_dispatch
from lagoon.quant import QuantConfig, QuantizedExperts, get_scheme, quantize_
from lagoon.quant.fidelity import sqnr_db
from lagoon.quant.w8a8 import INT_MM_FAST_CPU

E, H, INTER, T, K = 8, 64, 128, 40, 2
MIN_SQNR = {"bf16": 40.0, "int8": 35.0, "w8a8": 30.0, "fp8": 22.0, "int4": 15.0}



@pytest.fixture(autouse=True)
def _no_grad():
    # Inference-only tests; a module-level set_grad_enabled(False) would leak into other packages' tests.
    with torch.no_grad():
        yield


@pytest.fixture
def ref() -> ReferenceExperts:
    torch.manual_seed(0)
    return ReferenceExperts(E, H, INTER)


def routing(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])  # [T, k] distinct
    w = torch.rand(T, K, generator=g).softmax(-1)
    return x, idx, w


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "int4", "fp8", "bf16"])
def test_quantized_experts_vs_einsum_oracle(ref: ReferenceExperts, scheme: str) -> None:
    q = QuantizedExperts.from_float(ref, get_scheme(scheme, 32))
    x, idx, w = routing()
    y = q(x, idx, w)
    assert y.shape == (T, H)
    assert sqnr_db(ref(x, idx, w), y) > MIN_SQNR[scheme]


@pytest.mark.parametrize("scheme", ["int8", "w8a8", "int4", "fp8"])
def test_each_expert_projection_vs_fp64_on_dequantized_operands(ref: ReferenceExperts, scheme: str) -> None:
    q = QuantizedExperts.from_float(ref, get_scheme(scheme, 32))
    g = torch.Generator().manual_seed(11)
    for e in range(E):
        for proj, k in (("gate_up", H), ("down", INTER)):
            x = torch.randn(24, k, generator=g)
            y = q.expert_linear(e, proj, x)
            r = q.scheme.reference(x, q.tensors(proj, e), q.act_args(proj, e, None))
            assert ((y.double() - r).norm() / r.norm()).item() < 4e-3, (e, proj)


def test_capacity_plan_is_respected(ref: ReferenceExperts) -> None:
    q = QuantizedExperts.from_float(ref, get_scheme("int8"))
    x, idx, w = routing()
    plan = plan_dispatch(idx, E, capacity_factor=0.5)
    assert plan.dropped > 0
    assert sqnr_db(ref(x, idx, w, plan), q(x, idx, w, plan)) > MIN_SQNR["int8"]


def test_w8a8_experts_pick_kernel_per_expert_token_count(ref: ReferenceExperts) -> None:
    q = QuantizedExperts.from_float(ref, get_scheme("w8a8"))
    idx = torch.tensor([[0, 1]] * 20 + [[2, 3]] * 3 + [[4, 5]])  # 20, 20, 3, 3, 1, 1 tokens
    x, w = torch.randn(24, H), torch.rand(24, 2)
    q(x, idx, w)
    # experts 0, 1 (20 tokens) and 4, 5 (1 token) may use _int_mm; 2, 3 (3 tokens) never do
    fast = 8 if INT_MM_FAST_CPU else 0
    assert q.path_counts == {k: v for k, v in {"int_mm": fast, "int8pack_a8": 12 - fast}.items() if v}


def test_quantize_moe_block_keeps_router_float() -> None:
    torch.manual_seed(0)
    moe = SparseMoE(H, INTER, E, K, shared_intermediate_size=64, shared_expert_gate=True).eval()
    x = torch.randn(T, H)
    before = moe(x)
    report = quantize_(moe, QuantConfig(scheme="int8"))
    assert isinstance(moe.experts, QuantizedExperts)
    assert type(moe.router).__name__ == "Router" and isinstance(moe.shared_expert_gate, torch.nn.Linear)
    assert {"router", "shared_expert_gate"} <= set(report.kept)
    assert "shared_expert.gate_proj" in report.swapped
    assert sqnr_db(before, moe(x)) > 30.0


def test_quantize_whole_model_every_scheme() -> None:
    ids = torch.randint(0, 96, (1, 24))
    base = tiny_lm()(ids)
    for scheme, min_db in MIN_SQNR.items():
        m = tiny_lm()
        quantize_(m, QuantConfig(scheme=scheme, group_size=32))
        assert sqnr_db(base, m(ids)) > min_db, scheme
