"""Calibration: ranges per layer and per expert from routed tokens; starved experts are flagged and
stay dynamic; expert_calibration=False shares one pooled range across a module's experts."""

from __future__ import annotations

import math

import pytest
import torch
from quant_models import INTER, E, K, batches, tiny_lm

from lagoon.quant import QuantConfig, TokenType, calibrate, quantize_, token_types


@pytest.fixture(autouse=True)
def _no_grad():
    # Inference-only tests; a module-level set_grad_enabled(False) would leak into other packages' tests.
    with torch.no_grad():
        yield


def starve_last_expert(model) -> None:
    model.moe.router.e_score_correction_bias[E - 1] = -10.0  # never selected


def test_per_layer_and_per_expert_stats() -> None:
    m = tiny_lm()
    data = batches(4, 32)
    cal = calibrate(m, data)
    assert {"mix0", "mlp.gate_proj", "mlp.down_proj", "lm_head"} <= set(cal.linears)
    # untyped text counts as context and tool output, never as reasoning
    a = cal.linears["mix0"]
    assert a[TokenType.CONTEXT] == a[TokenType.TOOL_OUTPUT] and math.isnan(a[TokenType.REASONING])
    # mix0's input is the embedding: its range is the largest embedding row absmax used
    used = torch.cat([d.reshape(-1) for d in data])
    assert torch.isclose(a[0], m.embed_tokens.weight[used].abs().amax())
    st = cal.experts["moe.experts"]
    assert int(st.tokens.sum()) == 4 * 32 * K
    gu = st.gate_up_absmax[:, TokenType.CONTEXT]
    assert torch.isclose(gu.max(), st.pooled_gate_up[TokenType.CONTEXT])
    assert len(set(gu.tolist())) > 1  # experts see different tokens, so different ranges
    assert st.down_absmax.shape == (E, 3) and bool((st.down_absmax[:, 0] > 0).all())


def test_typed_calibration_keeps_types_apart() -> None:
    m = tiny_lm()
    ids = batches(1, 32)[0]
    types = torch.tensor([int(TokenType.CONTEXT)] * 16 + [int(TokenType.TOOL_OUTPUT)] * 16)
    cal = calibrate(m, [(ids, types)])
    a = cal.linears["mix0"]
    emb = m.embed_tokens.weight[ids[0]].abs().amax(-1)
    assert torch.isclose(a[0], emb[:16].max()) and torch.isclose(a[1], emb[16:].max())


def test_starved_experts_are_reported_and_stay_dynamic() -> None:
    m = tiny_lm()
    starve_last_expert(m)
    cal = calibrate(m, batches(4, 32))
    assert cal.experts["moe.experts"].tokens[E - 1] == 0
    assert cal.summary(min_expert_tokens=8)["experts"]["moe.experts"]["starved"] == [E - 1]
    quantize_(m, QuantConfig(scheme="w8a8", min_expert_tokens=8))
    starved = cal.apply(m, expert_calibration=True, min_expert_tokens=8)
    assert starved == {"moe.experts": [E - 1]}
    qe = m.moe.experts
    assert torch.isnan(qe.gate_up_act_absmax[E - 1]).all() and torch.isnan(qe.down_act_absmax[E - 1]).all()
    assert bool(torch.isfinite(qe.gate_up_act_absmax[: E - 1, :2]).all())
    # the starved expert still runs, dynamically, with finite output
    x = torch.randn(20, qe.hidden_dim)
    with token_types([TokenType.CONTEXT] * 20):
        y = qe.expert_forward(E - 1, x)
    assert bool(torch.isfinite(y).all()) and qe.dynamic_tokens == 40  # both projections


def test_expert_calibration_off_shares_pooled_range() -> None:
    m = tiny_lm()
    starve_last_expert(m)
    cal = calibrate(m, batches(4, 32))
    quantize_(m, QuantConfig(scheme="w8a8", expert_calibration=False), calibration=cal)
    qe = m.moe.experts
    col = qe.gate_up_act_absmax[:, TokenType.CONTEXT]
    assert bool((col == col[0]).all()) and not math.isnan(col[0])
    m2 = tiny_lm()
    starve_last_expert(m2)
    quantize_(m2, QuantConfig(scheme="w8a8", expert_calibration=True), calibration=cal)
    col2 = m2.moe.experts.gate_up_act_absmax[:, TokenType.CONTEXT]
    assert len(set(col2[: E - 1].tolist())) > 1 and math.isnan(col2[E - 1])
    assert m2.moe.experts.down_act_absmax.shape == (E, 3) and INTER == m2.moe.experts.intermediate_dim
