"""Sparse Mixture-of-Experts: routing, balancing, grouped dispatch, load monitoring, placement.

One MoE block (`SparseMoE`) is four stages::

    x [T, H]
      │
      ├─ route     Router: logits = x·Wᵀ [T, E] → softmax | sigmoid (÷ temperature) = scores
      │            selection = scores + bias − λ·share(window)   (grouped top-k when n_group > 1)
      │            indices [T, k] (ties → lower index); weights [T, k] from the *unbiased* scores
      │
      ├─ dispatch  plan_dispatch: sort the T·k slots by expert → contiguous segments, offsets [E]
      │            (dropless; or capacity ⌈c·T·k/E⌉ per expert, overflow dropped and counted)
      │
      ├─ experts   Experts: per segment  down_e( act(gate_e·x) ⊙ up_e·x )
      │            (one F.linear pair per expert, or F.grouped_mm over the offsets)
      │            ReferenceExperts: gather + einsum oracle for every fast/quantized/offloaded path
      │
      └─ combine   y[t] = Σ_j weights[t, j] · expert_out[t, j]   (+ shared expert, optionally gated)
                   → y [T, H]; counts [E] go back to the Router's window (observe)

Balancing: the runtime load penalty λ (``model_deployment.routing.load_balance_weight``) and the
aux-loss-free bias rule (``moe.bias_update_rate``) change *selection* only; recalibration fires
when the window's load CV passes ``moe.recalibration_cv``. Training losses live in `losses`.
`ExpertLoadMonitor` watches every block of a model (gauges, snapshot, heat map) and
`plan_placement` turns observed loads into an EPLB-style replicated expert placement.

Not here: attention and the decoder stack (`lagoon.model`), quantized experts (`lagoon.quant`).
"""

from lagoon.moe.balance import ExpertLoadMonitor, load_stats
from lagoon.moe.dispatch import DispatchPlan, plan_dispatch
from lagoon.moe.experts import Experts, ReferenceExperts
from lagoon.moe.layer import SharedExpert, SparseMoE, apply_config
from lagoon.moe.losses import load_balancing_loss, router_losses, router_z_loss
from lagoon.moe.placement import Placement, plan_placement
from lagoon.moe.router import Router, Routing

__all__ = [
    "DispatchPlan",
    "ExpertLoadMonitor",
    "Experts",
    "Placement",
    "ReferenceExperts",
    "Router",
    "Routing",
    "SharedExpert",
    "SparseMoE",
    "apply_config",
    "load_balancing_loss",
    "load_stats",
    "plan_dispatch",
    "plan_placement",
    "router_losses",
    "router_z_loss",
]
