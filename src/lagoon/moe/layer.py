"""`SparseMoE`: one MoE feed-forward block — route, dispatch, experts, combine, plus shared experts.

``forward(x)`` takes ``[T, H]`` or ``[B, S, H]`` and returns the same shape. After each call the
block keeps ``last_routing`` (for the training losses in `lagoon.moe.losses`), ``last_counts``
(routed slots per expert), ``last_dropped`` and the running ``dropped_total``.

Parameter names follow transformers 5.23 so checkpoints map 1:1 (HF name → Lagoon name):

=====================================================  ==========================================
HF (``mlp.`` of a Mixtral/Qwen2-MoE/Qwen3-MoE/OLMoE/     Lagoon ``SparseMoE``
DeepSeek-V3 decoder layer)
=====================================================  ==========================================
``gate.weight [E, H]``                                 ``router.weight [E, H]``
``gate.e_score_correction_bias [E]`` (DeepSeek-V3)     ``router.e_score_correction_bias [E]``
``experts.gate_up_proj [E, 2I, H]``                    ``experts.gate_up_proj``
``experts.down_proj [E, H, I]``                        ``experts.down_proj``
``shared_expert.{gate,up,down}_proj.weight`` (Qwen2)   ``shared_expert.{gate,up,down}_proj.weight``
``shared_experts.{gate,up,down}_proj.weight`` (DSv3)   ``shared_expert.{gate,up,down}_proj.weight``
``shared_expert_gate.weight [1, H]`` (Qwen2-MoE)       ``shared_expert_gate.weight [1, H]``
=====================================================  ==========================================

`load_state_dict` accepts either spelling (a pre-hook renames ``gate.`` and ``shared_experts.``),
so a HF block's state dict — or a decoder layer's ``mlp.*`` tensors after transformers' own
checkpoint conversion — loads directly. Checkpoint files on disk that still store per-expert
tensors (``experts.0.w1.weight``…) are stacked by the engine's checkpoint loader, not here.

Degraded experts: `quarantine(experts, reason)` masks experts out of routing (`Router.exclude`:
top-k over the healthy experts, weights renormalised), logs each expert once and counts it in
telemetry; `restore` puts them back. With ``check_finite`` on (the serving runtime,
`lagoon.moe.runtime`, turns it on) a forward whose output is non-finite while its input is finite
runs each routed expert alone on its tokens, quarantines the ones that emit non-finite values and
recomputes the call, so the request completes.

Compiled decode (the static path): while `torch.compile` traces the block (the engine's compiled
decode step, `lagoon.engine.compile`) or when ``static_path`` is set, ``forward`` takes shapes that
do not depend on the routing: `Router.route_static` (k slots, quarantine as a mask), the experts'
``gathered`` (each slot reads only its chosen expert's weights: llama.cpp's mul_mat_id), capacity
drops ranked in-graph, and the statistics a call produces accumulated in buffers
(one buffer, ``static_stats`` [2E + 2]: routed slots per expert, non-finite outputs per expert,
calls, dropped slots) instead of Python state. `MoeRuntime.step` reads every block's buffer in one
host transfer between scheduler steps and `apply_static` (or `drain_static`, one block) moves them into
the router's window (one window step per drain), ``last_counts`` / ``dropped_total`` and the load
monitor, and quarantines experts that emitted non-finite values. Unlike the eager path, which
re-routes the call at once, a non-finite slot in a static call contributes zero for that call (the
token keeps its other experts); the expert is quarantined from the next step on.

Constructor defaults reproduce the checkpoint's own routing (no runtime balancing);
`SparseMoE.from_config` / `apply_config` turn on what ``model_deployment.expert_routing`` and ``moe``
say. This module is *not* attention, norms or the residual: the decoder layer owns those.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.errors import CheckpointError, UnsupportedModelError
from lagoon.moe.dispatch import plan_dispatch
from lagoon.moe.experts import Experts, activation
from lagoon.moe.router import Router, Routing

__all__ = ["SparseMoE", "SharedExpert", "apply_config", "static_capacity_keep"]

log = logging.getLogger("lagoon.moe.health")


class SharedExpert(nn.Module):
    """A dense gated MLP every token passes through (Qwen2-MoE ``shared_expert``, DeepSeek ``shared_experts``)."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str = "silu") -> None:
        super().__init__()
        self.act_fn = activation(act)
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """Route → dispatch → experts → combine, plus optional (gated) shared experts."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        *,
        scoring: Literal["softmax", "sigmoid"] = "softmax",
        norm_topk_prob: bool = True,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        shared_intermediate_size: int | None = None,
        shared_expert_gate: bool = False,
        act: str = "silu",
        capacity_factor: float | None = None,
        temperature: float = 1.0,
        load_balance_weight: float = 0.0,
        balance_window: int = 1000,
        bias_update_rate: float = 0.0,
        recalibration_cv: float | None = None,
        experts_impl: str = "auto",
        weighting: Literal["scores", "unit"] = "scores",
    ) -> None:
        super().__init__()
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.capacity_factor = num_experts, capacity_factor
        self.router = Router(
            hidden_size,
            num_experts,
            top_k,
            scoring=scoring,
            norm_topk_prob=norm_topk_prob,
            n_group=n_group,
            topk_group=topk_group,
            routed_scaling_factor=routed_scaling_factor,
            temperature=temperature,
            load_balance_weight=load_balance_weight,
            balance_window=balance_window,
            bias_update_rate=bias_update_rate,
            recalibration_cv=recalibration_cv,
            weighting=weighting,
        )
        self.experts = Experts(num_experts, hidden_size, intermediate_size, act, impl=experts_impl)
        self.shared_expert = (
            SharedExpert(hidden_size, shared_intermediate_size, act) if shared_intermediate_size else None
        )
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if shared_expert_gate else None
        if shared_expert_gate and not shared_intermediate_size:
            raise UnsupportedModelError("shared_expert_gate needs shared_intermediate_size (no shared expert to gate)")
        self.last_routing: Routing | None = None
        self.last_counts: torch.Tensor | None = None
        self.last_dropped = 0
        self.dropped_total = 0
        self.quarantined: dict[int, str] = {}  # expert -> reason
        self.check_finite = False
        self.static_path = False  # run the static (compiled-decode) path eagerly: tests, benchmarks
        # in-graph statistics of static calls since the last drain_static (runtime state, not checkpoint data)
        # [E] routed slots per expert | [E] non-finite outputs per expert | calls | dropped slots
        self.register_buffer("static_stats", torch.zeros(2 * num_experts + 2, dtype=torch.int64), persistent=False)
        self.register_load_state_dict_pre_hook(_rename_hf_keys)

    @property
    def top_k(self) -> int:
        return self.router.top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # T = tokens, H = hidden, k = top_k
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # [T, H]
        if self.static_path or torch.compiler.is_compiling():
            return self._with_shared(x2, self._forward_static(x2)).reshape(shape)
        routing = self.router(x2)
        plan = plan_dispatch(routing.indices, self.num_experts, self.capacity_factor)
        y = self.experts(x2, routing.indices, routing.weights, plan)  # [T, H]
        if self.check_finite and not bool(torch.isfinite(y).all()) and bool(torch.isfinite(x2).all()):
            if self.quarantine(self._nonfinite_experts(x2, routing.indices), "non-finite output"):
                routing = self.router(x2)
                plan = plan_dispatch(routing.indices, self.num_experts, self.capacity_factor)
                y = self.experts(x2, routing.indices, routing.weights, plan)
        y = self._with_shared(x2, y)
        self.router.observe(plan.counts)
        self.last_routing, self.last_counts, self.last_dropped = routing, plan.counts, plan.dropped
        self.dropped_total += plan.dropped
        return y.reshape(shape)

    def _with_shared(self, x2: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.shared_expert is None:
            return y
        shared = self.shared_expert(x2)  # [T, H]
        if self.shared_expert_gate is not None:
            shared = F.sigmoid(self.shared_expert_gate(x2)) * shared
        return y + shared

    # ------------------------------------------------------------------ static (compiled decode) path
    @property
    def static_ready(self) -> bool:
        """Whether these experts have a static-shape path (``gathered``); if not, decode stays eager."""
        ok = getattr(self.experts, "gathered_ok", None)
        return ok is not None and bool(ok())

    def _forward_static(self, x2: torch.Tensor) -> torch.Tensor:
        # T = tokens, k = top_k, E = experts, H = hidden
        routing = self.router.route_static(x2)
        idx, valid = routing.indices, routing.valid  # [T, k]
        flat = idx.reshape(-1)  # [T*k]
        keep = valid
        dropped = torch.zeros(1, dtype=torch.int64, device=x2.device)
        if self.capacity_factor is not None:
            keep = valid & static_capacity_keep(idx, valid, self.num_experts, self.capacity_factor)
            dropped = (valid & ~keep).sum().view(1)
        ys = self.experts.gathered(x2, idx)  # [T, k, H] fp32
        nonfinite = torch.zeros(self.num_experts, dtype=torch.int64, device=x2.device)  # [E]
        if self.check_finite:
            bad = keep & ~torch.isfinite(ys).all(-1) & torch.isfinite(x2).all(-1, keepdim=True)  # [T, k]
            nonfinite = nonfinite.scatter_add(0, flat, bad.reshape(-1).long())
            keep = keep & ~bad
        # where, not a product: an unused slot's expert may be a quarantined one emitting NaN
        y = torch.where(keep.unsqueeze(-1), ys * routing.weights.unsqueeze(-1).float(), 0.0).sum(dim=1)  # [T, H]
        counts = torch.zeros(self.num_experts, dtype=torch.int64, device=x2.device).scatter_add(0, flat, valid.reshape(-1).long())
        self.static_stats.add_(torch.cat([counts, nonfinite, torch.ones_like(dropped), dropped]))  # one in-place update
        return y.to(x2.dtype)

    @torch.no_grad()
    def reset_static(self) -> None:
        """Zero the static-call statistics (in place: a compiled step holds the buffer)."""
        if not self.static_stats.is_meta:
            self.static_stats.zero_()

    @torch.no_grad()
    def drain_static(self) -> tuple[torch.Tensor, int] | None:
        """Read, zero and `apply_static` this block's static-call statistics."""
        if self.static_stats.is_meta:
            return None
        row = self.static_stats.tolist()
        self.reset_static()
        return self.apply_static(row)

    def apply_static(self, row: list[int]) -> tuple[torch.Tensor, int] | None:
        """Move one read of ``static_stats`` into the router window (one window step), ``last_counts``,
        ``dropped_total`` and quarantine; returns (counts [E], dropped) for the load monitor, or None
        when no static call ran."""
        e = self.num_experts
        if not row[2 * e]:
            return None
        counts, dropped = torch.tensor(row[:e]), row[2 * e + 1]
        self.router.observe(counts)
        self.last_counts, self.last_dropped = counts, dropped
        self.dropped_total += dropped
        bad = [i for i, n in enumerate(row[e : 2 * e]) if n]
        if bad:
            self.quarantine(bad, "non-finite output")
        return counts, dropped

    # ------------------------------------------------------------------ degraded experts
    def quarantine(self, experts: Iterable[int], reason: str) -> list[int]:
        """Mask `experts` out of routing; returns the newly quarantined ones (each logged once)."""
        new = [int(e) for e in dict.fromkeys(experts) if int(e) not in self.quarantined]
        if not new:
            return []
        self.router.exclude(set(self.quarantined) | set(new))  # raises before any state changes
        for e in new:
            self.quarantined[e] = reason
            log.warning("%s: expert %d quarantined (%s); routing over the %d healthy experts",
                        self.router.name, e, reason, self.num_experts - len(self.quarantined))
            if self.router.telemetry is not None:
                self.router.telemetry.inc("lagoon_moe_quarantined_total", labels={"layer": self.router.name, "reason": reason},
                                          doc="Experts quarantined (masked out of routing), by layer and reason")
        return new

    def restore(self, experts: Iterable[int]) -> None:
        """Put quarantined `experts` back into routing."""
        for e in experts:
            if self.quarantined.pop(int(e), None) is not None:
                log.warning("%s: expert %d restored to routing", self.router.name, int(e))
        self.router.exclude(set(self.quarantined))

    @torch.no_grad()
    def _nonfinite_experts(self, x: torch.Tensor, indices: torch.Tensor) -> list[int]:
        """Routed experts whose own output on their tokens has a non-finite value."""
        bad = []
        for e in indices.unique().tolist():
            rows = (indices == e).any(dim=-1)  # [T]
            xe = x[rows]  # [n, H]
            one = torch.full((xe.shape[0], 1), e, dtype=indices.dtype, device=indices.device)  # [n, 1]
            ye = self.experts(xe, one, torch.ones(one.shape, dtype=x.dtype, device=x.device))
            if not bool(torch.isfinite(ye).all()):
                bad.append(e)
        return bad

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_hf(cls, block: nn.Module, *, share: bool = False, **overrides: Any) -> SparseMoE:
        """A Lagoon block with the same weights and routing as a transformers 5.23 MoE block.

        ``share=True`` reuses the HF block's tensors instead of copying them (zero extra memory).
        Mixtral's training-only ``router_jitter_noise`` is not reproduced. `overrides` go to the
        constructor (e.g. ``experts_impl``, ``capacity_factor``).
        """
        gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
        if gate is None or experts is None or not hasattr(experts, "gate_up_proj"):
            raise UnsupportedModelError(
                f"{type(block).__name__} is not a supported MoE block; supported: MixtralSparseMoeBlock, "
                "Qwen2MoeSparseMoeBlock, Qwen3MoeSparseMoeBlock, OlmoeSparseMoeBlock, DeepseekV2Moe, DeepseekV3MoE "
                "(stacked experts.gate_up_proj / down_proj)"
            )
        num_experts, hidden = gate.weight.shape
        kw: dict[str, Any] = {
            "act": getattr(getattr(experts, "config", None), "hidden_act", "silu"),
            "norm_topk_prob": bool(getattr(gate, "norm_topk_prob", True)),
        }
        if hasattr(gate, "e_score_correction_bias"):  # DeepSeek-V3 style sigmoid router
            kw.update(
                scoring="sigmoid",
                n_group=gate.num_group,
                topk_group=gate.topk_group,
                routed_scaling_factor=float(gate.routed_scaling_factor),
            )
        elif hasattr(gate, "topk_method"):  # DeepSeek-V2: softmax, groups only under group_limited_greedy
            grouped = gate.topk_method == "group_limited_greedy"
            kw.update(
                n_group=int(gate.num_group) if grouped else 1,
                topk_group=int(gate.topk_group) if grouped else 1,
                routed_scaling_factor=float(gate.routed_scaling_factor),
                norm_topk_prob=False,  # transformers' DeepseekV2TopkRouter never renormalises
            )
        shared = getattr(block, "shared_expert", None) or getattr(block, "shared_experts", None)
        if shared is not None:
            kw["shared_intermediate_size"] = shared.gate_proj.out_features
            kw["shared_expert_gate"] = getattr(block, "shared_expert_gate", None) is not None
        kw.update(overrides)
        with torch.device("meta"):
            moe = cls(hidden, experts.down_proj.shape[-1], num_experts, gate.top_k, **kw)
        state = {k: v.detach() if share else v.detach().clone() for k, v in block.state_dict().items()}
        moe.load_state_dict(state, assign=True)
        if moe.router.scoring == "softmax":  # runtime-only buffer, absent from HF softmax blocks
            moe.router.e_score_correction_bias = torch.zeros(num_experts, device=gate.weight.device)
        for mod in moe.modules():  # runtime-only buffers (static-path state) start at zero
            for bname, buf in list(mod.named_buffers(recurse=False)):
                if buf is not None and buf.is_meta:
                    setattr(mod, bname, torch.zeros(buf.shape, dtype=buf.dtype, device=gate.weight.device))
        return moe

    @classmethod
    def from_config(cls, cfg: Any, *, hidden_size: int, intermediate_size: int, **kwargs: Any) -> SparseMoE:
        """A block sized by ``model_deployment.expert_routing`` with ``moe`` balancing/dispatch settings.

        `cfg` is a `LagoonConfig` (or anything with ``.model_deployment.expert_routing`` and ``.moe``);
        `kwargs` are the model's own constructor arguments (scoring, shared experts, act …).
        """
        routing = cfg.model_deployment.expert_routing
        moe = cls(hidden_size, intermediate_size, routing.total_experts, routing.active_per_token, **kwargs)
        return apply_config(moe, cfg)


def apply_config(model: nn.Module, cfg: Any) -> nn.Module:
    """Apply ``model_deployment.expert_routing.*`` and ``moe.*`` to every `SparseMoE` in `model`.

    ``total_experts`` must equal each block's expert count (CheckpointError otherwise);
    ``active_per_token`` becomes k; temperature, load penalty, window, bias rate, recalibration
    threshold and capacity factor are set on each block's router/dispatch. Returns `model`.
    """
    routing, moe_cfg = cfg.model_deployment.expert_routing, cfg.moe
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    for i, block in enumerate(blocks):
        if block.num_experts != routing.total_experts:
            raise CheckpointError(
                f"MoE block {i} has {block.num_experts} experts but model_deployment.expert_routing.total_experts is "
                f"{routing.total_experts}; set total_experts={block.num_experts} to match the checkpoint"
            )
        if routing.active_per_token > block.num_experts:
            raise CheckpointError(
                f"active_per_token={routing.active_per_token} exceeds the {block.num_experts} experts of block {i}"
            )
        r = block.router
        r.top_k = routing.active_per_token
        r.temperature = routing.temperature
        r.load_balance_weight = routing.load_balance_weight
        r.bias_update_rate = moe_cfg.bias_update_rate
        r.recalibration_cv = moe_cfg.recalibration_cv
        r.balance_window = moe_cfg.balance_window
        block.capacity_factor = moe_cfg.capacity_factor
    return model


def static_capacity_keep(indices: torch.Tensor, valid: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """`plan_dispatch`'s capacity rule in-graph: [T, k] True for the slots an expert accepts (its first
    ``ceil(c * S / E)`` valid slots in slot order, S = the valid slots)."""
    # S = T * k slots, E = experts
    flat, ok = indices.reshape(-1), valid.reshape(-1)  # [S]
    hits = F.one_hot(flat, num_experts) * ok.unsqueeze(-1).long()  # [S, E]
    rank = ((hits.cumsum(0) - hits) * hits).sum(-1)  # [S] valid slots of the same expert before this one
    n = ok.sum().double()
    # capacity_for's float64 arithmetic, ceil(c * S / E), at least 1
    capacity = torch.ceil(capacity_factor * n / num_experts).clamp(min=1)
    return (rank < capacity).view(indices.shape)


def _rename_hf_keys(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
    """Accept HF spellings: ``gate.*`` → ``router.*``, ``shared_experts.*`` → ``shared_expert.*``."""
    for key in list(state_dict):
        rest = key[len(prefix) :] if key.startswith(prefix) else None
        if rest is None:
            continue
        if rest in ("gate.weight", "gate.e_score_correction_bias"):
            state_dict[prefix + "router." + rest[len("gate.") :]] = state_dict.pop(key)
        elif rest.startswith("shared_experts."):
            state_dict[prefix + "shared_expert." + rest[len("shared_experts.") :]] = state_dict.pop(key)
    # A softmax router's bias is runtime state, not checkpoint data.
    bias_key = prefix + "router.e_score_correction_bias"
    if bias_key in state_dict and isinstance(module, SparseMoE) and module.router.scoring == "softmax":
        module.router.e_score_correction_bias.copy_(state_dict.pop(bias_key))
    _check_shapes(module, state_dict, prefix)


def _check_shapes(module: nn.Module, state_dict: dict, prefix: str) -> None:
    own = module.state_dict()
    for name, tensor in own.items():
        got = state_dict.get(prefix + name)
        if got is not None and tuple(got.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"tensor {prefix + name} has shape {tuple(got.shape)} but the MoE block expects "
                f"{tuple(tensor.shape)}; check num_experts / hidden / intermediate sizes against the checkpoint"
            )
