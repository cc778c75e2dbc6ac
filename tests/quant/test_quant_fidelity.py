"""Fidelity: SQNR per layer and per expert (worst named), KL / top-1 / perplexity over a text."""

from __future__ import annotations

import json
import math

import pytest
import torch
from quant_models import E, batches, tiny_lm

from lagoon.quant import QuantConfig, calibrate, quantize_, token_types
from lagoon.quant.fidelity import FidelityReport, layer_fidelity, sqnr_db, text_fidelity


@pytest.fixture(autouse=True)
def _no_grad():
    # Inference-only tests; a module-level set_grad_enabled(False) would leak into other packages' tests.
    with torch.no_grad():
        yield


def test_sqnr_db() -> None:
    x = torch.randn(1000)
    assert sqnr_db(x, x) == math.inf
    assert sqnr_db(x, x + 0.01 * x) == pytest.approx(40.0, abs=1e-4)


def test_layer_fidelity_names_every_layer_and_the_worst_expert() -> None:
    f, q = tiny_lm(), tiny_lm()
    quantize_(q, QuantConfig(scheme="int4", group_size=32))
    layers = layer_fidelity(f, q, batches(2, 32))
    by = {lf.name: lf for lf in layers}
    assert set(by) == {"mix0", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "mix1", "moe.experts"}
    assert all(15.0 < lf.sqnr_db < 40.0 for lf in layers)
    ex = by["moe.experts"]
    assert len(ex.expert_sqnr_db) == E and sum(ex.expert_tokens) == 2 * 32 * 2
    valid = {e: s for e, s in enumerate(ex.expert_sqnr_db) if s is not None}
    assert ex.worst_expert == min(valid, key=valid.get)


def test_shared_expert_scale_hides_a_bad_expert() -> None:
    # experts whose weights differ 16x: one range shared over all experts (expert_calibration off)
    # quantizes the small ones coarsely; the pooled number looks fine, the worst expert does not
    def build():
        m = tiny_lm()
        m.moe.experts.gate_up_proj[0] *= 16.0
        m.moe.experts.down_proj[0] *= 16.0
        return m

    f = build()
    data = batches(4, 32)
    cal = calibrate(f, data)
    rows = {}
    for per_expert in (False, True):
        q = build()
        quantize_(q, QuantConfig(scheme="w8a8", dynamic_threshold=1e9, expert_calibration=per_expert), calibration=cal)
        types = [0] * 32
        with token_types(types):
            lf = next(lf for lf in layer_fidelity(f, q, data) if lf.name == "moe.experts")
        rows[per_expert] = lf
    shared, own = rows[False], rows[True]
    worst_shared = shared.expert_sqnr_db[shared.worst_expert]
    assert shared.sqnr_db > worst_shared + 5.0  # pooled hides it
    assert own.expert_sqnr_db[own.worst_expert] > worst_shared + 5.0  # per-expert scales fix it


def test_text_fidelity_identity_and_quantized() -> None:
    f = tiny_lm()
    ids = torch.randint(0, 96, (100,), generator=torch.Generator().manual_seed(0))
    same = text_fidelity(f, f, ids, window=40)
    assert same.tokens == 99 and same.mean_kl == pytest.approx(0.0, abs=1e-9)
    assert same.top1_agreement == 1.0 and same.ppl_delta == pytest.approx(0.0, abs=1e-9)
    q = tiny_lm()
    quantize_(q, QuantConfig(scheme="int4", group_size=32, include_lm_head=True))
    got = text_fidelity(f, q, ids, window=40)
    # measured over seeds: mean KL 0.00075-0.0008, top-1 0.92-0.94 (int4, group 32, lm_head included)
    assert 0.0 < got.mean_kl < 0.003 and 0.85 < got.top1_agreement <= 1.0
    assert got.ppl_float == pytest.approx(same.ppl_float)
    report = FidelityReport(layers=layer_fidelity(f, q, [ids[None, :40]]), text=got)
    d = json.loads(json.dumps(report.to_dict()))
    assert d["format_version"] == 1 and d["text"]["tokens"] == 99 and d["worst_layer"]
