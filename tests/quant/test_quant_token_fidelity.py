"""Fidelity per token type: hand-checked KL / top-1 on fixed logits, and the three activation
policies on a tiny calibrated w8a8 model (all-static never scales dynamically, all-dynamic always)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from quant_models import V, batches, tiny_lm

from lagoon.quant import QuantConfig, TokenType, calibrate, quantize_
from lagoon.quant.fidelity import TRANSCRIPT, token_type_report, typed_fidelity

C, T, R = int(TokenType.CONTEXT), int(TokenType.TOOL_OUTPUT), int(TokenType.REASONING)


def test_typed_fidelity_hand_checked() -> None:
    # 5 tokens, 2-word vocabulary; position t predicts token t+1, whose type counts
    types = torch.tensor([C, C, T, R, R])
    p = torch.tensor([0.6, 0.4]).log()  # float model everywhere
    q_same, q_flip = p, torch.tensor([0.3, 0.7]).log()  # argmax 0 vs 1
    float_logits = p.expand(5, 2)
    quant_logits = torch.stack([q_same, q_flip, q_same, q_flip, q_same])  # last row is never scored
    got = {f.token_type: f for f in typed_fidelity(float_logits, quant_logits, types)}
    kl_flip = 0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.7)
    assert kl_flip == pytest.approx(0.192042, abs=1e-6)  # 0.6·ln 2 + 0.4·ln(4/7) = 0.415888 − 0.223846
    # CONTEXT: predicted by position 0 (same)            -> KL 0, top-1 1
    assert got["CONTEXT"].tokens == 1 and got["CONTEXT"].mean_kl == pytest.approx(0.0, abs=1e-12)
    assert got["CONTEXT"].top1_agreement == 1.0
    # TOOL_OUTPUT: position 1 (flipped)                 -> KL 0.192042, top-1 0
    assert got["TOOL_OUTPUT"].tokens == 1 and got["TOOL_OUTPUT"].mean_kl == pytest.approx(kl_flip)
    assert got["TOOL_OUTPUT"].top1_agreement == 0.0
    # REASONING: positions 2 (same) and 3 (flipped)     -> KL 0.096021, top-1 0.5
    assert got["REASONING"].tokens == 2 and got["REASONING"].mean_kl == pytest.approx(kl_flip / 2)
    assert got["REASONING"].top1_agreement == 0.5


@torch.no_grad()
def test_policies_on_a_tiny_calibrated_w8a8_model() -> None:
    ref = tiny_lm()
    cal = calibrate(ref, batches(4, 32))
    q = tiny_lm()
    quantize_(q, QuantConfig(scheme="w8a8", dynamic_threshold=0.75), calibration=cal)
    ids = torch.randint(0, V, (24,), generator=torch.Generator().manual_seed(9))
    types = torch.tensor([C] * 8 + [T] * 8 + [R] * 8)
    rep = {r.policy: r for r in token_type_report(ref, q, ids, types)}
    assert rep["all-dynamic"].dynamic_fraction == 1.0 and rep["all-static"].dynamic_fraction == 0.0
    assert 1 / 3 <= rep["policy"].dynamic_fraction < 1.0  # reasoning (a third) always, others by threshold
    for r in rep.values():
        assert [f.tokens for f in r.per_type] == [7, 8, 8]  # position 0 predicts nothing of its own
        assert all(0.0 <= f.mean_kl and 0.0 <= f.top1_agreement <= 1.0 for f in r.per_type)
    assert all(m.dynamic_threshold == 0.75 for m in q.modules() if hasattr(m, "dynamic_threshold"))  # restored


def test_shipped_transcript_has_every_role() -> None:
    t = json.loads(TRANSCRIPT.read_text())
    assert t["format_version"] == 1 and "lagoon run" in t["source"]
    assert {m["role"] for m in t["messages"]} == {"system", "user", "assistant", "tool"}
