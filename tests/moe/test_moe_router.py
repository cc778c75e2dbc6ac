import logging

import pytest
import torch

from lagoon.moe.router import Router, coefficient_of_variation
from lagoon.telemetry import Telemetry

H, E, K = 16, 8, 2


def skewed(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(H, generator=g) * 3 + torch.randn(n, H, generator=g)  # [n, H] shared offset


def test_deterministic_across_runs_and_instances():
    x = torch.randn(50, H)
    torch.manual_seed(5)
    a = Router(H, E, K)
    torch.manual_seed(5)
    b = Router(H, E, K)
    first = a(x).indices
    for _ in range(3):
        assert torch.equal(a(x).indices, first)
    assert torch.equal(b(x).indices, first)


def test_ties_broken_by_lower_index():
    r = Router(H, E, 3)
    with torch.no_grad():
        r.weight.zero_()  # every expert scores the same
    out = r(torch.randn(6, H))
    assert out.indices.tolist() == [[0, 1, 2]] * 6
    torch.testing.assert_close(out.weights, torch.full((6, 3), 1 / 3))


def test_temperature_scales_logits():
    torch.manual_seed(0)
    r = Router(H, E, K, norm_topk_prob=False, temperature=2.0)
    x = torch.randn(10, H)
    out = r(x)
    torch.testing.assert_close(out.scores, (out.logits / 2.0).softmax(-1))
    torch.testing.assert_close(out.weights, out.scores.gather(1, out.indices))
    flat = Router(H, E, K, temperature=4.0)
    flat.load_state_dict(r.state_dict())
    hot = Router(H, E, K, temperature=0.5)
    hot.load_state_dict(r.state_dict())
    assert flat(x).scores.max() < hot(x).scores.max()


def test_grouped_topk_stays_in_groups():
    torch.manual_seed(1)
    r = Router(H, 16, 4, scoring="sigmoid", n_group=4, topk_group=1)
    idx = r(torch.randn(40, H)).indices
    groups = idx // 4
    assert (groups == groups[:, :1]).all()  # all 4 picks in the single kept group


def test_runtime_penalty_changes_selection_not_mixing_weights():
    torch.manual_seed(2)
    plain = Router(H, E, K)
    balanced = Router(H, E, K, load_balance_weight=2.0, balance_window=50)
    balanced.load_state_dict(plain.state_dict())
    x = skewed(64)
    cv_plain, cv_bal = [], []
    for step in range(20):
        p, b = plain(x), balanced(x)
        balanced.observe(torch.bincount(b.indices.flatten(), minlength=E))
        torch.testing.assert_close(p.scores, b.scores)  # the model's own scores are untouched
        # weights are the model's scores at the chosen experts, renormalised
        expect = b.scores.gather(1, b.indices)
        torch.testing.assert_close(b.weights, expect / expect.sum(-1, keepdim=True))
        same = (p.indices.sort(-1)[0] == b.indices.sort(-1)[0]).all(-1)
        torch.testing.assert_close(p.weights.sort(-1)[0][same], b.weights.sort(-1)[0][same])
        if step:
            cv_plain.append(coefficient_of_variation(torch.bincount(p.indices.flatten(), minlength=E)))
            cv_bal.append(coefficient_of_variation(torch.bincount(b.indices.flatten(), minlength=E)))
    assert not torch.equal(p.indices, b.indices)
    assert sum(cv_bal) / len(cv_bal) < 0.75 * sum(cv_plain) / len(cv_plain)


def test_penalty_zero_is_off():
    torch.manual_seed(3)
    r = Router(H, E, K, load_balance_weight=0.0, recalibration_cv=None)
    assert not r.tracking
    x = skewed(32)
    first = r(x).indices
    r.observe(torch.tensor([100, 0, 0, 0, 0, 0, 0, 0]))
    assert torch.equal(r(x).indices, first)


def test_bias_rule_only_in_training():
    r = Router(H, 4, 1, scoring="sigmoid", bias_update_rate=0.01)
    counts = torch.tensor([10, 2, 2, 2])
    r.train()
    r.observe(counts)
    torch.testing.assert_close(r.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))
    r.eval()
    r.observe(counts)
    torch.testing.assert_close(r.e_score_correction_bias, torch.tensor([-0.01, 0.01, 0.01, 0.01]))


def test_recalibration_counted_logged_and_in_telemetry(caplog):
    r = Router(H, 4, 1, balance_window=3, recalibration_cv=0.15)
    tel = Telemetry()
    r.telemetry, r.name = tel, "layers.0.mlp"
    with caplog.at_level(logging.INFO, logger="lagoon.moe.router"):
        r.observe(torch.tensor([6, 2, 2, 2]))
        r.observe(torch.tensor([6, 2, 2, 2]))
        assert r.recalibrations == 0  # window not yet full
        r.observe(torch.tensor([6, 2, 2, 2]))
    assert r.recalibrations == 1
    # share = [.5, 1/6, 1/6, 1/6]; mean share .25 -> bias += .25 - share
    torch.testing.assert_close(r.e_score_correction_bias, torch.tensor([-0.25, 1 / 12, 1 / 12, 1 / 12]))
    assert "recalibrated" in caplog.text and "layers.0.mlp" in caplog.text
    assert tel.value("lagoon_moe_recalibrations_total", {"layer": "layers.0.mlp"}) == 1
    assert r.window_load().sum() == 0  # window restarts after an event
    for _ in range(3):
        r.observe(torch.tensor([3, 3, 3, 3]))
    assert r.recalibrations == 1  # balanced load: no event


def test_recalibration_rebalances_skewed_selection():
    torch.manual_seed(4)
    r = Router(H, E, K, balance_window=5, recalibration_cv=0.15)
    x = skewed(128)
    before = coefficient_of_variation(torch.bincount(r(x).indices.flatten(), minlength=E))
    for _ in range(40):
        r.observe(torch.bincount(r(x).indices.flatten(), minlength=E))
    after = coefficient_of_variation(torch.bincount(r(x).indices.flatten(), minlength=E))
    assert r.recalibrations >= 1 and after < before


def test_bad_router_args():
    from lagoon.errors import ConfigError

    with pytest.raises(ConfigError, match="n_group"):
        Router(H, 10, 2, n_group=3)
    with pytest.raises(ConfigError, match="topk_group"):
        Router(H, 8, 4, n_group=4, topk_group=1)
    with pytest.raises(ConfigError, match="temperature"):
        Router(H, 8, 2, temperature=0)
