"""`plan_dispatch`: sort a routing decision's token slots by expert into contiguous segments.

A *slot* is one (token, choice) pair: T tokens with top-k routing make ``S = T * k`` slots, slot
``s`` belonging to token ``s // k``. The plan says, for the slots sorted by expert (stable, so
within an expert earlier tokens come first):

* ``order [S]`` — slot ids in expert order; ``tokens [S]`` — their token ids;
* ``counts [E]`` — routed slots per expert (the load, before any drop);
* ``offsets [E]`` — int32 end of each expert's segment (the ``offs`` grouped GEMM expects);
* ``kept [S]`` (slot order) — False for slots dropped by the capacity limit.

Dropless by default. With ``capacity_factor`` c each expert accepts at most
``ceil(c * S / E)`` slots; the overflow (later tokens first) is dropped, its contribution is zero
(the token keeps its other experts and the residual stream), and ``dropped`` counts it. Dropped
slots are removed from the segments, so ``counts_kept``/``offsets`` describe what actually runs.

This module is *not* the expert computation (`lagoon.moe.experts`) and not the combine, which
is a weighted sum over each token's k slots done by the experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["DispatchPlan", "plan_dispatch", "capacity_for"]


@dataclass
class DispatchPlan:
    """Slots sorted by expert; see the module docstring for each field's meaning."""

    order: torch.Tensor  # [S'] slot ids (kept only), grouped by expert
    tokens: torch.Tensor  # [S'] token id of each sorted slot
    counts: torch.Tensor  # [E] routed slots per expert (before drops)
    counts_kept: torch.Tensor  # [E] slots per expert that run
    offsets: torch.Tensor  # [E] int32 cumulative ends of the kept segments
    kept: torch.Tensor  # [S] bool, by slot id
    dropped: int
    capacity: int | None

    @property
    def num_slots(self) -> int:
        return self.kept.numel()


def capacity_for(num_slots: int, num_experts: int, capacity_factor: float | None) -> int | None:
    """Per-expert slot capacity for a step, or None when dropless."""
    if capacity_factor is None:
        return None
    return max(1, math.ceil(capacity_factor * num_slots / num_experts))


def plan_dispatch(
    indices: torch.Tensor, num_experts: int, capacity_factor: float | None = None
) -> DispatchPlan:
    """Group the slots of ``indices [T, k]`` by expert; drop overflow past the capacity, if any."""
    # S = T * k slots, E = experts
    k = indices.shape[-1]
    flat = indices.reshape(-1)  # [S]
    sorted_experts, order = torch.sort(flat, stable=True)  # [S], [S]
    counts = torch.bincount(flat, minlength=num_experts)  # [E]
    capacity = capacity_for(flat.numel(), num_experts, capacity_factor)
    kept = torch.ones_like(flat, dtype=torch.bool)  # [S] by slot id
    dropped = 0
    counts_kept = counts
    if capacity is not None and int(counts.max()) > capacity:
        starts = torch.cumsum(counts, 0) - counts  # [E]
        rank = torch.arange(flat.numel(), device=flat.device) - starts[sorted_experts]  # [S] pos in segment
        keep_sorted = rank < capacity  # [S] sorted order
        kept[order[~keep_sorted]] = False
        order = order[keep_sorted]
        counts_kept = counts.clamp(max=capacity)
        dropped = int((~keep_sorted).sum())
    offsets = torch.cumsum(counts_kept, 0, dtype=torch.int32)  # [E]
    return DispatchPlan(
        order=order,
        tokens=torch.div(order, k, rounding_mode="floor"),
        counts=counts,
        counts_kept=counts_kept,
        offsets=offsets,
        kept=kept,
        dropped=dropped,
        capacity=capacity,
    )
