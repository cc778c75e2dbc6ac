"""Each `model_deployment.routing.*` and `moe.*` key changes what a SparseMoE does."""

import pytest
import torch

from lagoon.config import load_config
from lagoon.errors import CheckpointError
from lagoon.moe import SparseMoE, apply_config
from lagoon.moe.router import coefficient_of_variation

H = 16


def build(*overrides: str, seed: int = 0) -> SparseMoE:
    torch.manual_seed(seed)
    cfg = load_config(
        "model_deployment.routing.total_experts=8",
        "model_deployment.routing.load_balance_weight=0",
        "moe.recalibration_cv=1000",
        "moe.bias_update_rate=0",
        *overrides,
    )
    return SparseMoE.from_config(cfg, hidden_size=H, intermediate_size=8).eval()


def skewed(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(9)
    return torch.randn(H, generator=g) * 3 + torch.randn(n, H, generator=g)


def test_total_experts_and_active_per_token():
    moe = build("model_deployment.routing.total_experts=6", "model_deployment.routing.active_per_token=3")
    assert moe.experts.gate_up_proj.shape[0] == 6
    moe(torch.randn(5, H))
    assert moe.last_routing.indices.shape == (5, 3)
    assert build().router.top_k == 2  # the default


def test_total_experts_mismatch_is_a_checkpoint_error():
    block = SparseMoE(H, 8, 4, 2)
    cfg = load_config("model_deployment.routing.total_experts=8")
    with pytest.raises(CheckpointError, match="total_experts=4"):
        apply_config(torch.nn.Sequential(block), cfg)


def test_temperature():
    hot, cold = build(seed=1), build("model_deployment.routing.temperature=3.0", seed=1)
    x = torch.randn(7, H)
    hot(x)
    cold(x)
    torch.testing.assert_close(cold.last_routing.scores, (hot.last_routing.logits / 3).softmax(-1))
    assert cold.last_routing.scores.max() < hot.last_routing.scores.max()


def test_load_balance_weight_changes_selection():
    x = skewed()
    off, on = build(seed=2), build("model_deployment.routing.load_balance_weight=2.0", seed=2)
    picks = {"off": [], "on": []}
    with torch.no_grad():
        for _ in range(6):
            off(x)
            on(x)
            picks["off"].append(off.last_routing.indices)
            picks["on"].append(on.last_routing.indices)
    assert all(torch.equal(p, picks["off"][0]) for p in picks["off"])  # no penalty: same every call
    assert not all(torch.equal(p, picks["on"][0]) for p in picks["on"])  # penalty: load moves


def test_balance_window_and_recalibration_cv():
    moe = build("moe.balance_window=3", "moe.recalibration_cv=0.15", seed=3)
    assert moe.router.balance_window == 3
    x = skewed()
    with torch.no_grad():
        moe(x)
        moe(x)
        assert moe.router.recalibrations == 0  # window of 3 not yet full
        moe(x)
    assert moe.router.recalibrations == 1
    lenient = build("moe.balance_window=3", "moe.recalibration_cv=100", seed=3)
    with torch.no_grad():
        for _ in range(6):
            lenient(x)
    assert lenient.router.recalibrations == 0


def test_bias_update_rate_in_training():
    moe = build("moe.bias_update_rate=0.05", seed=4).train()
    moe(skewed())
    bias = moe.router.e_score_correction_bias
    counts = moe.last_counts.double()
    torch.testing.assert_close(bias, 0.05 * torch.sign(counts.mean() - counts).float())
    frozen = build(seed=4).train()
    frozen(skewed())
    assert not frozen.router.e_score_correction_bias.any()


def test_capacity_factor_drops():
    x = skewed()
    dropless, capped = build(seed=5), build("moe.capacity_factor=1.0", seed=5)
    with torch.no_grad():
        dropless(x)
        capped(x)
    assert dropless.last_dropped == 0
    counts = capped.last_counts
    assert capped.last_dropped == int((counts - 16).clamp(min=0).sum()) > 0  # capacity 64*2/8 = 16
    assert coefficient_of_variation(counts) > 0.15
