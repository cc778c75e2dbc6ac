"""GPTQ for int4: round each weight column so the *layer output* error on calibration inputs stays
small, not each weight's own error (Frantar et al., 2023).

For a Linear with inputs X [T, K] the objective is ‖X·Wᵀ − X·Qᵀ‖², whose curvature is
H = 2·XᵀX / T [K, K] (`Hessians` collects it with forward pre-hooks while `calibrate` runs the
float model). Columns are quantized left to right; each column's rounding error is pushed onto the
columns not yet quantized through the inverse Hessian, in its upper Cholesky form U (H⁻¹ = UᵀU):

    err = (w_i − q_i) / U_ii;    W[:, j] −= err · U_ij   for j > i

done in blocks of `block` columns (a rank-`block` update for the rest, as in the paper). The int4
grid of each group (`Int4WeightOnly.grid`: min..max, 16 levels) is fixed when the group's first
column is reached, from the weights as updated so far, so the result is stored by the int4 scheme
exactly as it was chosen (`Int4WeightOnly.encode`). Damping: `damp` x mean(diag H) on the diagonal;
inputs never seen (diag 0) leave their columns free (weight 0 in the objective).

Inputs come from the float model (every layer sees float activations), not layer by layer from the
already-quantized prefix as in the paper: one calibration pass serves every layer (not measured
against the sequential variant here). Not here: act-order (column permutation), MoE experts (their Hessians would be per
expert; experts keep round-to-nearest).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from lagoon.quant.int4 import Int4WeightOnly

__all__ = ["Hessians", "gptq_int4", "DAMP", "BLOCK"]

DAMP = 0.01
BLOCK = 128


class Hessians:
    """Accumulates H = 2·XᵀX / T for chosen Linears while a model runs (attach, run, detach).

    Linears called one after another on the very same input tensor (q/k/v, gate/up) share one sum
    (the grouping is fixed on the first call, by object identity), so memory is one [K, K] fp32 per
    distinct input, not per Linear."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}  # leader name -> Σ xᵀx [K, K] fp32
        self.tokens: dict[str, int] = {}
        self.leader: dict[str, str] = {}  # name -> the Linear whose sum it shares
        self._handles: list[Any] = []
        self._last: tuple[torch.Tensor | None, str] = (None, "")

    def attach(self, model: nn.Module, want: Callable[[str, nn.Linear], bool]) -> None:
        def hook(name: str) -> Callable[..., None]:
            def fn(mod: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0]
                prev, prev_leader = self._last
                same = prev is x  # identity: the previous hook saw this very tensor
                lead = self.leader.setdefault(name, prev_leader if same else name)
                self._last = (x, lead)
                if lead != name:
                    return  # a sibling (the leader) adds this input
                x2 = x.detach().reshape(-1, x.shape[-1]).float()  # [T, K]
                if lead not in self.sums:
                    self.sums[lead] = torch.zeros(x2.shape[1], x2.shape[1])
                    self.tokens[lead] = 0
                self.sums[lead].addmm_(x2.t(), x2)
                self.tokens[lead] += x2.shape[0]

            return fn

        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and want(name, m):
                self._handles.append(m.register_forward_pre_hook(hook(name)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = (None, "")

    def get(self, name: str) -> torch.Tensor | None:
        """H [K, K] fp64 for `name`, or None if it saw no tokens."""
        lead = self.leader.get(name)
        n = self.tokens.get(lead, 0) if lead else 0
        return None if n == 0 else 2.0 * self.sums[lead].double() / n


@torch.no_grad()
def gptq_int4(
    w: torch.Tensor, h: torch.Tensor, scheme: Int4WeightOnly, damp: float = DAMP, block: int = BLOCK
) -> dict[str, torch.Tensor]:
    """w [N, K], H [K, K] -> the int4 scheme's tensors for GPTQ-rounded weights."""
    n, k = w.shape
    gs = scheme.group_size
    assert k % gs == 0 and block % gs == 0
    w = w.detach().float().clone()  # fp32 updates, as the paper's code (fp64 only for the factorisation)
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(k, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()  # H⁻¹ = UᵀU
    codes = torch.zeros(n, k)
    scale = torch.zeros(n, k // gs, dtype=torch.bfloat16)
    zero = torch.zeros_like(scale)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        wb = w[:, b0:b1].clone()  # [N, B], updated as its columns are quantized
        errs = torch.zeros_like(wb)
        ub = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            col = b0 + i
            if col % gs == 0:
                g = col // gs
                scale[:, g], zero[:, g] = scheme.grid(wb[:, i : i + gs])
            g = col // gs
            c = scheme.codes(wb[:, i : i + 1], scale[:, g], zero[:, g])[:, 0]  # [N]
            codes[:, col] = c
            q = (c - 8.0) * scale[:, g].float() + zero[:, g].float()
            err = (wb[:, i] - q) / ub[i, i]
            wb[:, i:] -= err.unsqueeze(1) * ub[i, i:].unsqueeze(0)
            errs[:, i] = err
        w[:, b1:] -= errs @ u[b0:b1, b1:]
    return scheme.encode(codes.to(torch.int32), scale, zero)
