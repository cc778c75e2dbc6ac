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


def _hf_v2_router(n_group: int, topk_group: int, k: int, scale: float, seed: int):
    from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter

    cfg = DeepseekV2Config(hidden_size=H, num_attention_heads=4, n_routed_experts=16, num_experts_per_tok=k, n_group=n_group,
                           topk_group=topk_group, topk_method="group_limited_greedy", routed_scaling_factor=scale)
    hf = DeepseekV2TopkRouter(cfg)
    with torch.no_grad():
        hf.weight.copy_(torch.randn(16, H, generator=torch.Generator().manual_seed(seed)))
    return hf


@pytest.mark.parametrize(("n_group", "topk_group", "k"), [(4, 2, 3), (8, 3, 6), (4, 1, 4)])
def test_grouped_softmax_is_deepseek_v2_group_limited_greedy(n_group, topk_group, k):
    """DeepSeek-V2's router (transformers' DeepseekV2TopkRouter): softmax scores, the topk_group
    groups with the best single score kept, top k inside them, weights = the softmax probabilities
    x routed_scaling_factor (no renormalisation). Same experts and weights on 300 fresh tokens; the
    group limit is live (plain top k differs) and ranks groups by their best expert, not by the sum
    of their best two (DeepSeek-V3's rule, which picks other experts here)."""
    hf = _hf_v2_router(n_group, topk_group, k, 2.5, seed=n_group + k)
    r = Router(H, 16, k, scoring="softmax", n_group=n_group, topk_group=topk_group, norm_topk_prob=False,
               routed_scaling_factor=2.5)
    with torch.no_grad():
        r.weight.copy_(hf.weight)
        x = torch.randn(300, H, generator=torch.Generator().manual_seed(k))
        _, want_w, want_i = hf(x)
        got = r(x)
    order = want_i.argsort(dim=-1)
    want_i, want_w = want_i.gather(1, order), want_w.gather(1, order)
    order = got.indices.argsort(dim=-1)
    assert torch.equal(got.indices.gather(1, order), want_i)
    torch.testing.assert_close(got.weights.gather(1, order), want_w, rtol=1e-6, atol=0)
    plain = got.scores.topk(k, dim=-1).indices.sort(dim=-1).values
    assert (plain != want_i).any(dim=-1).sum() > 10  # the group limit changes the choice
    top2 = got.scores.view(300, n_group, -1).topk(2, dim=-1).values.sum(-1)  # V3's group score
    keep = top2.topk(topk_group, dim=-1).indices
    mask = torch.zeros(300, n_group, dtype=torch.bool).scatter_(1, keep, True).repeat_interleave(16 // n_group, 1)
    v3 = got.scores.masked_fill(~mask, -1.0).topk(k, dim=-1).indices.sort(dim=-1).values
    assert (v3 != want_i).any(dim=-1).sum() > 0  # ... and the max rule is the one that matches


def test_grouped_softmax_renormalises_when_asked_and_static_path_agrees():
    """norm_topk_prob: the kept softmax probabilities sum to routed_scaling_factor; `route_static`
    (the compiled step's router) picks and weighs as `forward` does, also with an expert quarantined
    and with a whole group quarantined (its group never wins on the excluded expert's score)."""
    torch.manual_seed(3)
    r = Router(H, 16, 3, scoring="softmax", n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.5)
    x = torch.randn(64, H)
    with torch.no_grad():
        out = r(x)
        torch.testing.assert_close(out.weights.sum(-1), torch.full((64,), 1.5))
        for bad in ([], [5], [4, 5, 6, 7], [0, 1, 2, 3, 9, 10]):
            r.exclude(bad)
            eager, static = r(x), r.route_static(x)
            assert torch.equal(eager.indices, static.indices), bad
            torch.testing.assert_close(eager.weights, static.weights, rtol=1e-6, atol=0)
            assert not set(bad) & set(eager.indices.flatten().tolist())
            groups = (eager.indices // 4).tolist()
            assert all(len(set(row)) <= 2 for row in groups), bad  # within the topk_group = 2 kept groups


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
