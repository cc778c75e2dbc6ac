"""A tiny random language model with dense MLPs and a Lagoon SparseMoE block, for quant tests.

A module of its own name, not conftest: `from conftest import` found tests/engine's conftest when
both folders ran in one pytest call."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.moe import SparseMoE

V, H, INTER, E, K = 96, 64, 128, 8, 2


class TinyMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(H, INTER, bias=False)
        self.up_proj = nn.Linear(H, INTER, bias=False)
        self.down_proj = nn.Linear(INTER, H, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyLM(nn.Module):
    """embed -> (mix, MLP) -> (mix, MoE) -> lm_head; residual stream, no attention (causal by construction)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(V, H)
        self.mix0 = nn.Linear(H, H)
        self.mlp = TinyMLP()
        self.mix1 = nn.Linear(H, H)
        self.moe = SparseMoE(H, INTER, E, K)
        self.lm_head = nn.Linear(H, V, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)  # [B, T, H]
        x = x + self.mlp(self.mix0(x))
        x = x + self.moe(self.mix1(x))
        return self.lm_head(x)  # [B, T, V]


def tiny_lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    m = TinyLM()
    with torch.no_grad():
        m.moe.router.weight.normal_(0, 0.5)
    return m.eval()


def batches(n: int = 4, t: int = 32, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, V, (1, t), generator=g) for _ in range(n)]
