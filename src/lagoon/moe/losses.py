"""Router training losses: the Switch/GShard load-balancing loss and the ST-MoE router z-loss.

Load-balancing loss (Switch Transformer eq. 4, Megatron ``switch_load_balancing_loss_func``)::

    L_aux = E · Σ_i f_i · P_i
    f_i = (slots routed to expert i) / (T · k)      — share of the T·k assignments, no gradient
    P_i = (1/T) Σ_t p_t,i                          — mean router probability, carries the gradient

With this normalisation a perfectly uniform router gives exactly 1 for any k (HF's
``load_balancing_loss_func`` divides f by T instead, so its uniform value is k), and total collapse
onto k experts gives E/k. Multiply by the coefficient yourself (Mixtral/Qwen-MoE use 1e-3..1e-2,
OLMoE 1e-2). For sigmoid routers ``p`` is the per-token normalised score ``s / Σ s`` (DeepSeek-V3's
sequence-wise auxiliary loss does the same).

Router z-loss (ST-MoE eq. 5)::

    L_z = (1/T) Σ_t (log Σ_i exp(logit_t,i))²

which keeps router logits small so the softmax stays in fp32's comfortable range; the paper's
coefficient is 1e-3.

`router_losses(model)` sums both over every `SparseMoE` block's last forward. Not here: the
aux-loss-free bias rule, which is not a loss (`Router.observe`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["load_balancing_loss", "router_z_loss", "router_losses"]


def load_balancing_loss(scores: torch.Tensor, indices: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Switch loss ``E · Σ f_i P_i`` for scores ``[T, E]`` and selected ``indices [T, k]`` (uniform = 1)."""
    # T = tokens, E = experts, k = top_k
    probs = scores / scores.sum(dim=-1, keepdim=True)  # [T, E]; a no-op for softmax scores
    counts = torch.bincount(indices.reshape(-1), minlength=num_experts).to(probs.dtype)  # [E]
    f = counts / indices.numel()  # [E]
    p = probs.mean(dim=0)  # [E]
    return num_experts * torch.sum(f.detach() * p)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss ``mean_t logsumexp(logits_t)²`` for logits ``[T, E]``."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def router_losses(model: nn.Module, aux_weight: float = 1e-2, z_weight: float = 1e-3) -> torch.Tensor:
    """``aux_weight · L_aux + z_weight · L_z`` summed over every MoE block's last forward pass."""
    from lagoon.moe.layer import SparseMoE

    total = torch.zeros(())
    for block in model.modules():
        if isinstance(block, SparseMoE) and block.last_routing is not None:
            r = block.last_routing
            if aux_weight:
                total = total + aux_weight * load_balancing_loss(r.scores, r.indices, block.num_experts)
            if z_weight:
                total = total + z_weight * router_z_loss(r.logits)
    return total
