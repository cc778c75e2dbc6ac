import math

import torch

from lagoon.moe import SparseMoE
from lagoon.moe.losses import load_balancing_loss, router_losses, router_z_loss


def test_aux_loss_uniform_is_one_and_collapse_is_e_over_k():
    e, k, t = 8, 2, 16
    uniform = torch.full((t, e), 1 / e)
    idx = torch.arange(t * k).view(t, k) % e  # every expert gets t*k/e slots
    assert math.isclose(float(load_balancing_loss(uniform, idx, e)), 1.0, rel_tol=1e-6)
    collapsed = torch.zeros(t, e)
    collapsed[:, :k] = 1 / k
    idx = torch.tensor([[0, 1]] * t)
    assert math.isclose(float(load_balancing_loss(collapsed, idx, e)), e / k, rel_tol=1e-6)


def test_aux_loss_by_hand_and_gradient_only_through_probs():
    scores = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]], requires_grad=True)
    idx = torch.tensor([[0], [1]])
    # f = [.5, .5, 0], P = [.4, .4, .2] -> 3 * (.2 + .2) = 1.2
    loss = load_balancing_loss(scores, idx, 3)
    assert math.isclose(float(loss.detach()), 1.2, rel_tol=1e-6)
    loss.backward()
    # dL/dp_ti = E f_i / T = 1.5 f_i; through p = s / sum(s) (rows sum to 1):
    # dL/ds_tj = 1.5 (f_j - sum_i f_i p_ti); row 0: sum = .45, row 1: .5*.1 + .5*.6 = .35
    expect = torch.tensor([[0.075, 0.075, -0.675], [0.225, 0.225, -0.525]])
    torch.testing.assert_close(scores.grad, expect)


def test_sigmoid_scores_are_normalised_per_token():
    s = torch.tensor([[0.9, 0.9, 0.1, 0.1]])
    idx = torch.tensor([[0, 1]])
    # p = [.45, .45, .05, .05], f = [.5, .5, 0, 0] -> 4 * .45 = 1.8
    assert math.isclose(float(load_balancing_loss(s, idx, 4)), 1.8, rel_tol=1e-6)


def test_z_loss_by_hand():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expect = (math.log(2) ** 2 + math.log(math.e + math.e**2) ** 2) / 2
    assert math.isclose(float(router_z_loss(logits)), expect, rel_tol=1e-6)


def test_router_losses_sum_over_blocks():
    torch.manual_seed(0)
    model = torch.nn.Sequential(SparseMoE(16, 8, 4, 2), SparseMoE(16, 8, 4, 2))
    assert float(router_losses(model)) == 0.0  # nothing routed yet
    model(torch.randn(10, 16))
    each = [
        0.01 * load_balancing_loss(b.last_routing.scores, b.last_routing.indices, 4)
        + 0.001 * router_z_loss(b.last_routing.logits)
        for b in model
    ]
    torch.testing.assert_close(router_losses(model, 0.01, 0.001), sum(each))
