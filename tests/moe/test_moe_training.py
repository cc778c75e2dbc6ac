"""A short training run: routing collapses without balancing; aux loss and the bias rule keep CV < 15%."""

import pytest
import torch

from lagoon.moe import SparseMoE
from lagoon.moe.losses import router_losses
from lagoon.moe.router import coefficient_of_variation

H, E, K = 16, 8, 2


def train(mode: str, steps: int = 150, seed: int = 0) -> tuple[float, float]:
    """Fit a fixed teacher on inputs sharing a large common offset (which starts routing collapsed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(123)
        offset = torch.randn(H, generator=g) * 2.0
        a, b = torch.randn(H, 32, generator=g) / 4, torch.randn(32, H, generator=g) / 6
        moe = SparseMoE(H, 16, E, K, bias_update_rate=1e-2 if mode == "bias" else 0.0).train()
        opt = torch.optim.Adam(moe.parameters(), lr=1e-2)
        load = torch.zeros(E)
        for step in range(steps):
            x = offset + torch.randn(64, H)
            loss = (moe(x) - torch.tanh(x @ a) @ b).pow(2).mean()
            if mode == "aux":
                loss = loss + router_losses(moe, aux_weight=0.1, z_weight=0.0)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step >= steps - 30:
                load += moe.last_counts
        return coefficient_of_variation(load), float(load.max() / load.sum())
    finally:
        torch.set_num_threads(threads)


def test_collapse_without_balancing():
    cv, top_share = train("none")
    assert cv > 1.0 and top_share > 0.4  # most slots on one or two experts


@pytest.mark.parametrize("mode", ["aux", "bias"])
def test_balancing_keeps_cv_under_15_percent(mode):
    cv, _ = train(mode)
    assert cv < 0.15
