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

Balancing: the runtime load penalty λ (``model_deployment.expert_routing.load_balance_weight``) and the
aux-loss-free bias rule (``moe.bias_update_rate``) change *selection* only; recalibration fires
when the window's load CV passes ``moe.recalibration_cv``. Training losses live in `losses`.
`ExpertLoadMonitor` watches every block of a model (gauges, snapshot, heat map) and
`plan_placement` turns observed loads into an EPLB-style replicated expert placement.

Offloading (`offload_model`, from outside like quantization): each block's experts become an
`OffloadedExperts` backed by a fixed-size `ExpertCache` per layer (LRU / LFU / LRFU eviction) and a
slower `expert_store` tier (pinned host memory or a memory-mapped safetensors file), with optional
background prefetch of the next layer's experts guessed by its router (speculative routing) or by
past co-activations. `count_parameters` / `check_declaration` (`footprint`) measure total and
per-token active parameters against ``model_deployment``'s declaration.

Not here: attention and the decoder stack (`lagoon.model`), quantized experts (`lagoon.quant`).
"""

from lagoon.moe.balance import ExpertLoadMonitor, load_stats
from lagoon.moe.dispatch import DispatchPlan, plan_dispatch
from lagoon.moe.expert_cache import POLICIES, ExpertCache
from lagoon.moe.expert_store import DiskStore, HostStore
from lagoon.moe.experts import Experts, ReferenceExperts
from lagoon.moe.footprint import DeclarationReport, Footprint, check_declaration, count_parameters
from lagoon.moe.layer import SharedExpert, SparseMoE, apply_config
from lagoon.moe.losses import load_balancing_loss, router_losses, router_z_loss
from lagoon.moe.offload import ExpertOffload, OffloadedExperts, offload_model, offload_of
from lagoon.moe.placement import Placement, plan_placement
from lagoon.moe.router import Router, Routing

__all__ = [
    "POLICIES",
    "DeclarationReport",
    "DiskStore",
    "DispatchPlan",
    "ExpertCache",
    "ExpertLoadMonitor",
    "ExpertOffload",
    "Experts",
    "Footprint",
    "HostStore",
    "OffloadedExperts",
    "Placement",
    "ReferenceExperts",
    "Router",
    "Routing",
    "SharedExpert",
    "SparseMoE",
    "apply_config",
    "check_declaration",
    "count_parameters",
    "load_balancing_loss",
    "load_stats",
    "offload_model",
    "offload_of",
    "plan_dispatch",
    "plan_placement",
    "router_losses",
    "router_z_loss",
]
