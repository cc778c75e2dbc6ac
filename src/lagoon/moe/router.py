"""`Router`: scores experts, selects the top k of them for each token, and keeps load balanced.

Contract (T = tokens, H = hidden, E = experts, k = top_k):

* ``forward(x [T, H]) -> Routing(logits [T, E], scores [T, E], weights [T, k], indices [T, k])``.
* Scoring: ``softmax`` (Mixtral, Qwen2/3-MoE, OLMoE) or ``sigmoid`` (DeepSeek-V3, GLM-4.5, Laguna),
  both of the fp32 logits divided by ``temperature``; with ``logit_softcap`` c > 0 (Laguna) the
  logits are first squashed to c·tanh(logits / c).
* Selection score = ``scores + bias - load_balance_weight * share`` where ``bias`` is the
  ``e_score_correction_bias`` buffer (DeepSeek-V3's, nudged by the aux-loss-free rule and by
  recalibration) and ``share`` is each expert's share of routed assignments over the rolling
  window of the last ``balance_window`` forward calls. With ``n_group > 1`` only the experts of
  ``topk_group`` groups are eligible: the groups with the highest sum of their two best selection
  scores under sigmoid scoring (DeepSeek-V3 / GLM-4.5 ``noaux_tc``), the groups with the highest
  single selection score under softmax scoring (DeepSeek-V2 / V2.5 ``group_limited_greedy``).
  The rule follows the scoring because each checkpoint family was trained with one pairing.
* Ties are broken by the lower expert index (a stable descending sort), so the same input and the
  same router state pick the same experts on every run.
* ``weighting="unit"`` (a `lagoon moefy` model: experts are slices of one dense FFN, so the
  chosen ones are summed as they are) makes every chosen expert's weight 1; otherwise:
* Mixing weights are gathered from the *unbiased, unpenalised* ``scores``; renormalised over the
  top k when ``norm_topk_prob``; multiplied by ``routed_scaling_factor``. Balancing therefore
  changes which experts run, never how the chosen ones are weighted.
* `observe(counts)` (called by `SparseMoE` after dispatch) pushes one step of per-expert load
  into the window, applies the aux-loss-free rule ``bias += rate * sign(mean(load) - load)``
  while training (or when ``update_bias_in_eval``), and recalibrates when the coefficient of
  variation of the window's load passes ``recalibration_cv``: ``bias += mean(share) - share``
  (a proportional correction in score units), window cleared, event counted in
  ``recalibrations``, logged, and counted in telemetry when one is attached.
* Deferred updates (serving): with ``deferred = True`` `observe` only queues the step's load and
  `commit()` applies the queued steps in order. The engine's scheduler commits once per scheduler
  step, so routing state (window shares, bias) never changes inside a step: every request in a
  batched step is routed by the same state, and a prefill never sees a half-updated window.
* Excluded experts (quarantine, `lagoon.moe.health`): `exclude(experts)` masks them out of routing.
  For softmax scoring their logits become −inf before the softmax, so scores, top-k and mixing
  weights are exactly those of the same router with those experts' rows removed; for sigmoid
  scoring they are never selected and the kept weights are renormalised as usual. k shrinks to the
  number of healthy experts when fewer than k are left.
* Static routing (`route_static`, the compiled decode step): the same decision with shapes that do
  not depend on the data and no host reads. The exclusion is the ``excluded_mask`` buffer [E], the
  load penalty reads the ``window_share`` buffer [E] (each expert's window share, rewritten by every
  committed step; zeros while the window is empty, so subtracting it is exact), k stays ``top_k`` and
  ``Routing.valid`` [T, k] marks the slots past the healthy count (weight 0, never run). Weights,
  indices and the valid slots equal `forward`'s.

Not here: training losses (`lagoon.moe.losses`), dispatch, and cross-layer monitoring
(`lagoon.moe.balance`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.errors import ConfigError

__all__ = ["Router", "Routing", "SCORINGS"]

log = logging.getLogger("lagoon.moe.router")

SCORINGS = ("softmax", "sigmoid")
WEIGHTINGS = ("scores", "unit")


@dataclass
class Routing:
    """One routing decision. `scores` are the unbiased post-softmax/sigmoid scores."""

    logits: torch.Tensor  # [T, E] fp32
    scores: torch.Tensor  # [T, E] fp32
    weights: torch.Tensor  # [T, k] mixing weights (input dtype)
    indices: torch.Tensor  # [T, k] int64 expert ids
    valid: torch.Tensor | None = None  # [T, k] bool (`route_static`): False = slot past the healthy experts


class Router(nn.Module):
    """Top-k router with runtime load penalty, aux-loss-free bias and CV-triggered recalibration."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        scoring: Literal["softmax", "sigmoid"] = "softmax",
        norm_topk_prob: bool = True,
        n_group: int = 1,
        topk_group: int = 1,
        routed_scaling_factor: float = 1.0,
        temperature: float = 1.0,
        load_balance_weight: float = 0.0,
        balance_window: int = 1000,
        bias_update_rate: float = 0.0,
        recalibration_cv: float | None = None,
        update_bias_in_eval: bool = False,
        weighting: Literal["scores", "unit"] = "scores",
    ) -> None:
        super().__init__()
        if weighting not in WEIGHTINGS:
            raise ConfigError(f"unknown expert weighting {weighting!r}; valid: {', '.join(WEIGHTINGS)}")
        self.weighting = weighting
        if scoring not in SCORINGS:
            raise ConfigError(f"unknown router scoring {scoring!r}; valid: {', '.join(SCORINGS)}")
        if not 1 <= top_k <= num_experts:
            raise ConfigError(f"top_k={top_k} must be between 1 and num_experts={num_experts}; lower top_k")
        if n_group < 1 or num_experts % n_group:
            raise ConfigError(f"n_group={n_group} must divide num_experts={num_experts}")
        if not 1 <= topk_group <= n_group or topk_group * (num_experts // n_group) < top_k:
            raise ConfigError(
                f"topk_group={topk_group} of n_group={n_group} leaves fewer than top_k={top_k} experts; "
                "raise topk_group"
            )
        if temperature <= 0:
            raise ConfigError(f"router temperature must be > 0 (got {temperature})")
        if balance_window < 1:
            raise ConfigError(f"balance_window must be >= 1 (got {balance_window})")
        self.hidden_size, self.num_experts, self.top_k = hidden_size, num_experts, top_k
        self.scoring = scoring
        self.norm_topk_prob = norm_topk_prob
        self.n_group, self.topk_group = n_group, topk_group
        self.routed_scaling_factor = routed_scaling_factor
        self.logit_softcap = 0.0  # > 0: logits = c·tanh(logits / c) before scoring (Laguna)
        self.temperature = temperature
        self.load_balance_weight = load_balance_weight
        self.bias_update_rate = bias_update_rate
        self.recalibration_cv = recalibration_cv
        self.update_bias_in_eval = update_bias_in_eval
        self.recalibrations = 0
        self.deferred = False
        self._pending: list[torch.Tensor] = []
        self._excluded: torch.Tensor | None = None  # [E] bool, True = masked out of routing
        self.telemetry = None  # a lagoon.telemetry.Telemetry, set by ExpertLoadMonitor.attach
        self.name = "router"
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))  # [E, H]
        if not self.weight.is_meta:  # on meta (every checkpoint load) normal_'s meta kernel imports torch._dynamo
            nn.init.normal_(self.weight, std=hidden_size**-0.5)
        self.bias: nn.Parameter | None = None  # [E] logit bias (gpt-oss); set by the model when it has one
        # DeepSeek-V3 checkpoints carry the bias; for softmax models it is runtime state only.
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(num_experts), persistent=scoring == "sigmoid"
        )
        # routing state the compiled step reads as tensors (never checkpoint data)
        self.register_buffer("excluded_mask", torch.zeros(num_experts, dtype=torch.bool), persistent=False)  # [E]
        self.register_buffer("window_share", torch.zeros(num_experts), persistent=False)  # [E] = load_share()
        # host-side bookkeeping, never on the meta device or the accelerator; the [W, E] ring is
        # allocated on the first observe() that needs it (W=1000 x 48 layers would cost ~50 MB)
        self._balance_window = balance_window
        self._window: torch.Tensor | None = None  # [W, E] ring of per-step loads
        self._window_sum = torch.zeros(num_experts, dtype=torch.float64, device="cpu")  # [E]
        self._window_pos = 0
        self._window_fill = 0

    # ------------------------------------------------------------------ window
    @property
    def balance_window(self) -> int:
        return self._balance_window

    @balance_window.setter
    def balance_window(self, steps: int) -> None:
        if steps < 1:
            raise ConfigError(f"balance_window must be >= 1 (got {steps})")
        self._balance_window = steps
        self._window = None
        self.reset_window()

    def reset_window(self) -> None:
        if self._window is not None:
            self._window.zero_()
        self._window_sum.zero_()
        self._window_pos = self._window_fill = 0
        self._sync_share()

    def _sync_share(self) -> None:
        if not self.window_share.is_meta:
            self.window_share.copy_(self.load_share())

    def window_load(self) -> torch.Tensor:
        """Routed assignments per expert summed over the window, [E] float64."""
        return self._window_sum.clone()

    def load_share(self) -> torch.Tensor:
        """Each expert's share of the window's assignments, [E] fp32 (zeros when empty)."""
        total = self._window_sum.sum()
        if total <= 0:
            return torch.zeros(self.num_experts, device="cpu")
        return (self._window_sum / total).float()

    @property
    def tracking(self) -> bool:
        """Whether `observe` has any work (penalty, recalibration, or the bias rule while it applies)."""
        bias_rule = self.bias_update_rate > 0 and (self.training or self.update_bias_in_eval)
        return self.load_balance_weight > 0 or bias_rule or self.recalibration_cv is not None

    # ------------------------------------------------------------------ exclusion
    def exclude(self, experts: set[int] | list[int]) -> None:
        """Mask `experts` out of routing (all others healthy); an empty set restores them all."""
        bad = sorted(set(int(e) for e in experts))
        if any(not 0 <= e < self.num_experts for e in bad):
            raise ConfigError(f"expert ids {bad} out of range 0..{self.num_experts - 1}")
        if len(bad) == self.num_experts:
            raise ConfigError(f"{self.name}: cannot exclude all {self.num_experts} experts; restore at least one")
        mask = torch.zeros(self.num_experts, dtype=torch.bool)
        mask[bad] = True
        self._excluded = mask if bad else None
        if not self.excluded_mask.is_meta:
            self.excluded_mask.copy_(mask)  # in place: a compiled step holds this tensor

    @property
    def excluded(self) -> list[int]:
        return [] if self._excluded is None else self._excluded.nonzero().flatten().tolist()

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> Routing:
        # T = tokens, H = hidden, E = experts, G = groups, k = top_k
        x = x.reshape(-1, self.hidden_size)  # [T, H]
        logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())  # [T, E]
        if self.logit_softcap > 0:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        z = logits / self.temperature if self.temperature != 1.0 else logits
        excluded = None if self._excluded is None else self._excluded.to(z.device)
        if excluded is not None and self.scoring == "softmax":
            z = z.masked_fill(excluded, float("-inf"))  # softmax over the healthy experts only
        scores = z.softmax(dim=-1) if self.scoring == "softmax" else z.sigmoid()  # [T, E]
        if excluded is not None and self.scoring == "sigmoid":
            scores = scores.masked_fill(excluded, 0.0)
        choice = scores
        bias = self.e_score_correction_bias
        if self.scoring == "sigmoid" or bool(bias.any()):
            choice = choice + bias.float()
        if self.load_balance_weight > 0 and self._window_fill:
            choice = choice - self.load_balance_weight * self.load_share().to(choice.device)
        if self.n_group > 1:
            choice = self._group_mask(choice, excluded)
        k = self.top_k
        if excluded is not None:
            choice = choice.masked_fill(excluded, float("-inf"))
            k = min(k, self.num_experts - int(excluded.sum()))
        # stable sort: equal scores keep ascending expert order -> lower index wins ties
        indices = torch.sort(choice, dim=-1, descending=True, stable=True)[1][:, :k]  # [T, k]
        if self.weighting == "unit":
            weights = torch.ones(indices.shape, dtype=x.dtype, device=x.device)  # [T, k]
            return Routing(logits=logits, scores=scores, weights=weights, indices=indices)
        weights = scores.gather(1, indices)  # [T, k]
        if self.norm_topk_prob:
            denom = weights.sum(dim=-1, keepdim=True)
            weights = weights / (denom + 1e-20) if self.scoring == "sigmoid" else weights / denom
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return Routing(logits=logits, scores=scores, weights=weights.to(x.dtype), indices=indices)

    def route_static(self, x: torch.Tensor) -> Routing:
        """`forward`'s decision with data-independent shapes and no host reads (module docstring)."""
        # T = tokens, E = experts, k = top_k
        x = x.reshape(-1, self.hidden_size)  # [T, H]
        logits = F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())  # [T, E]
        if self.logit_softcap > 0:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        z = logits / self.temperature if self.temperature != 1.0 else logits
        excluded = self.excluded_mask  # [E]
        if self.scoring == "softmax":
            scores = z.masked_fill(excluded, float("-inf")).softmax(dim=-1)  # [T, E]
        else:
            scores = z.sigmoid().masked_fill(excluded, 0.0)
        choice = scores + self.e_score_correction_bias.float()  # + 0 where forward skips the bias: exact
        if self.load_balance_weight > 0:
            choice = choice - self.load_balance_weight * self.window_share
        if self.n_group > 1:
            choice = self._group_mask(choice, excluded)
        choice = choice.masked_fill(excluded, float("-inf"))
        k = self.top_k
        indices = torch.sort(choice, dim=-1, descending=True, stable=True)[1][:, :k]  # [T, k]
        healthy = self.num_experts - excluded.sum()
        valid = (torch.arange(k, device=x.device) < healthy).expand(indices.shape)  # [T, k]
        if self.weighting == "unit":
            return Routing(logits=logits, scores=scores, weights=valid.to(x.dtype), indices=indices, valid=valid)
        weights = scores.gather(1, indices) * valid  # [T, k]
        if self.norm_topk_prob:
            denom = weights.sum(dim=-1, keepdim=True)
            weights = weights / (denom + 1e-20) if self.scoring == "sigmoid" else weights / denom
        if self.routed_scaling_factor != 1.0:
            weights = weights * self.routed_scaling_factor
        return Routing(logits=logits, scores=scores, weights=weights.to(x.dtype), indices=indices, valid=valid)

    def _group_mask(self, choice: torch.Tensor, excluded: torch.Tensor | None) -> torch.Tensor:
        """`choice` [T, E] with the experts outside the `topk_group` best groups at -inf."""
        t, e = choice.shape
        per = e // self.n_group
        if self.scoring == "sigmoid":  # DeepSeek-V3 noaux_tc: a group is worth its two best experts
            grouped = choice.view(t, self.n_group, per)  # [T, G, E/G]
            group_scores = grouped.topk(min(2, per), dim=-1)[0].sum(dim=-1)  # [T, G]
        else:  # DeepSeek-V2 group_limited_greedy: a group is worth its best healthy expert
            if excluded is not None:  # a quarantined expert must not carry its group in
                choice = choice.masked_fill(excluded, float("-inf"))
            group_scores = choice.view(t, self.n_group, per).amax(dim=-1)  # [T, G]
        keep = torch.sort(group_scores, dim=-1, descending=True, stable=True)[1][:, : self.topk_group]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # [T, G]
        mask = mask.unsqueeze(-1).expand(t, self.n_group, per).reshape(t, e)  # [T, E]
        return choice.masked_fill(~mask, float("-inf"))

    # ------------------------------------------------------------------ balancing
    @torch.no_grad()
    def observe(self, counts: torch.Tensor) -> None:
        """Record one step's routed assignments per expert ([E]) and apply the balancing rules
        (queued until `commit` when ``deferred``)."""
        if not self.tracking:
            return
        counts = counts.detach().to(torch.float64).cpu()  # [E]
        if self.deferred:
            self._pending.append(counts)
        else:
            self._push(counts)

    @torch.no_grad()
    def commit(self) -> int:
        """Apply the queued steps in order; returns how many (0: routing state unchanged)."""
        pending, self._pending = self._pending, []
        for counts in pending:
            self._push(counts)
        return len(pending)

    def _push(self, counts: torch.Tensor) -> None:
        w = self._balance_window
        if self._window is None:
            self._window = torch.zeros(w, self.num_experts, dtype=torch.float64, device="cpu")
        self._window_sum -= self._window[self._window_pos]
        self._window[self._window_pos] = counts
        self._window_sum += counts
        self._window_pos = (self._window_pos + 1) % w
        self._window_fill = min(self._window_fill + 1, w)
        self._sync_share()
        bias = self.e_score_correction_bias
        if self.bias_update_rate > 0 and (self.training or self.update_bias_in_eval):
            step = torch.sign(counts.mean() - counts).to(bias)  # [E]
            bias.add_(self.bias_update_rate * step)
        if self.recalibration_cv is not None and self._window_fill == w:
            cv = coefficient_of_variation(self._window_sum)
            if cv > self.recalibration_cv:
                share = self.load_share().to(bias)
                bias.add_(share.mean() - share)
                self.recalibrations += 1
                log.info(
                    "%s: load CV %.3f > %.3f over %d steps; recalibrated bias (event %d)",
                    self.name, cv, self.recalibration_cv, w, self.recalibrations,
                )
                if self.telemetry is not None:
                    self.telemetry.inc(
                        "lagoon_moe_recalibrations_total",
                        labels={"layer": self.name},
                        doc="Router bias recalibrations triggered by load CV, by layer",
                    )
                self.reset_window()


def coefficient_of_variation(load: torch.Tensor) -> float:
    """std / mean of a per-expert load vector (population std); 0 for an all-zero load."""
    load = load.to(torch.float64)
    mean = load.mean()
    if mean <= 0:
        return 0.0
    return float(load.std(unbiased=False) / mean)
