"""GPTQ (int4): the blocked Cholesky implementation against a plain optimal-brain-surgeon reference
(explicit inverse Hessian, one column at a time), and against round-to-nearest on the objective it
minimises; Hessians collected once per shared input."""

from __future__ import annotations

import torch
from torch import nn

from lagoon.quant import QuantConfig, calibrate, get_scheme, quantize_
from lagoon.quant.gptq import DAMP, gptq_int4
from lagoon.quant.int4 import Int4WeightOnly, unpack_int4


def correlated_inputs(t: int, k: int, seed: int) -> torch.Tensor:
    """Inputs with strongly correlated channels and a few large ones (what makes GPTQ pay off)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(k, k, generator=g) / k**0.5 + torch.eye(k)
    x = torch.randn(t, k, generator=g) @ mix
    return x * (1 + 4 * (torch.rand(k, generator=g) > 0.9))


def obs_reference(w: torch.Tensor, h: torch.Tensor, scheme: Int4WeightOnly) -> torch.Tensor:
    """Codes [N, K] by the textbook update: quantize column i, move its error onto the remaining
    columns through the current inverse Hessian, then remove column i from that inverse."""
    n, k = w.shape
    gs = scheme.group_size
    w = w.double().clone()
    h = h.double() + DAMP * torch.diag(h.double()).mean() * torch.eye(k, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    codes = torch.zeros(n, k)
    for i in range(k):
        if i % gs == 0:
            scale, zero = scheme.grid(w[:, i : i + gs])
        c = scheme.codes(w[:, i : i + 1], scale, zero)[:, 0]
        codes[:, i] = c
        q = (c.double() - 8) * scale.double() + zero.double()
        err = (w[:, i] - q) / hinv[i, i]
        w[:, i + 1 :] -= err.unsqueeze(1) * hinv[i, i + 1 :].unsqueeze(0)
        hinv = hinv - torch.outer(hinv[:, i], hinv[i, :]) / hinv[i, i]
    return codes


def output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return ((x.double() @ (w.double() - wq.double()).t()).norm() / (x.double() @ w.double().t()).norm()).item()


def test_blocked_gptq_matches_the_obs_reference() -> None:
    torch.manual_seed(0)
    n, k, gs = 16, 128, 32
    w = torch.randn(n, k)
    x = correlated_inputs(512, k, seed=1)
    h = 2 * x.double().t() @ x.double() / x.shape[0]
    scheme = Int4WeightOnly(gs)
    got = gptq_int4(w, h, scheme, block=64)  # blocks of 64: two groups a block, two blocks
    codes = unpack_int4(got["packed"], gs).float()
    ref = obs_reference(w, h, scheme)
    assert (codes == ref).float().mean().item() > 0.995  # fp64 rounding may flip a code at a tie


def test_gptq_beats_round_to_nearest_on_layer_output() -> None:
    torch.manual_seed(2)
    lin = nn.Linear(256, 64, bias=False)
    x_all = correlated_inputs(1280, 256, seed=3)
    x, x_test = x_all[:1024], x_all[1024:]  # calibrate on some inputs, measure on others
    h = 2 * x.double().t() @ x.double() / x.shape[0]
    scheme = get_scheme("int4", 64)
    rtn = scheme.dequantize(scheme.quantize(lin.weight.detach()))
    gq = scheme.dequantize(gptq_int4(lin.weight.detach(), h, scheme))
    e_rtn, e_gptq = output_error(x_test, lin.weight.detach(), rtn), output_error(x_test, lin.weight.detach(), gq)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.o = nn.Linear(64, 64), nn.Linear(64, 32), nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.tanh(self.q(x)) * self.k(x).repeat(1, 1, 2))


@torch.no_grad()
def test_hessians_shared_per_input_and_used_by_quantize() -> None:
    torch.manual_seed(4)
    m = Block().eval()
    data = [torch.randn(1, 16, 64) for _ in range(3)]
    cal = calibrate(m, data, forward=lambda mdl, x: mdl(x), hessians=True)
    hs = cal.hessians
    assert hs.leader == {"q": "q", "k": "q", "o": "o"}  # q and k read the same tensor: one sum
    x = torch.cat([d.reshape(-1, 64) for d in data])
    assert torch.allclose(hs.get("k"), 2 * x.double().t() @ x.double() / 48, rtol=1e-5, atol=1e-5)
    report = quantize_(m, QuantConfig(scheme="int4", group_size=32), calibration=cal)
    assert report.gptq == ["q", "k", "o"]
    off = Block().eval()
    assert not quantize_(off, QuantConfig(scheme="int4", group_size=32, gptq=False), calibration=cal).gptq
