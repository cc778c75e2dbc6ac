"""`calibrate`: run text through a float model and record activation ranges for static scales.

For every `nn.Linear` the input absmax is kept per token type (`lagoon.quant.policy.TokenType`),
and per input channel as well (``linear_channels [3, K]``: what SmoothQuant needs, see
`lagoon.quant.smooth`).
For every stacked experts module (``gate_up_proj [E, 2I, H]``, ``down_proj [E, H, I]``) the ranges are
kept **per expert, from the tokens actually routed to it**: the hook reads the routing decision the
experts receive (``indices [T, k]``), takes expert e's tokens, and records the absmax of its
gate_up input and of its down input ``act(gate)·up`` (recomputed from the float weights), plus the
token count. A pooled range per module (all tokens, all experts) is kept too.

`Calibration.apply(model, expert_calibration, min_expert_tokens)` writes the ranges into the
quantized modules' ``act_absmax`` buffers (for a smoothed layer, the range of its smoothed input
``x / s``: max over channels of channel absmax / s):

- ``expert_calibration=True``: each expert gets its own range; an expert that saw fewer than
  `min_expert_tokens` calibration tokens is *starved*: it is reported (returned, and logged) and left
  uncalibrated, i.e. scaled dynamically — never given a NaN or zero scale.
- ``expert_calibration=False``: every expert of a module shares the pooled range.

Untyped calibration text (no `token_types` block around it) counts as both context and tool output.
Reasoning tokens are always dynamic, so no static range is written for them. This module does not
quantize weights; `quantize_` does, and calls `apply` when given a calibration.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lagoon.quant.policy import N_TOKEN_TYPES, TokenType, current_token_types

if TYPE_CHECKING:
    from lagoon.quant.gptq import Hessians

__all__ = ["Calibration", "ExpertStats", "calibrate", "CALIBRATION_TEXT"]

CALIBRATION_TEXT = Path(__file__).resolve().parent / "data" / "calibration.txt"
"""The shipped calibration text (code, prose and tool output; disjoint from the held-out text):
what `lagoon quantize` calibrates w8a8 / fp8 on unless given another or told not to."""

log = logging.getLogger(__name__)
_STATIC_TYPES = (TokenType.CONTEXT, TokenType.TOOL_OUTPUT)


def _nan(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32)


def _merge_max(acc: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(acc), new, torch.fmax(acc, new))


def _typed_absmax(x: torch.Tensor, types: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (absmax per type [3] (NaN where unseen), tokens per type [3])."""
    own = x.detach().abs().amax(-1).float()  # [M]
    out, counts = _nan(N_TOKEN_TYPES), torch.zeros(N_TOKEN_TYPES, dtype=torch.long)
    if own.numel() == 0:
        return out, counts
    if types is None:  # untyped text: it stands for context and tool output alike
        for t in _STATIC_TYPES:
            out[t], counts[t] = own.max(), own.numel()
        return out, counts
    for t in range(N_TOKEN_TYPES):
        sel = own[types.to(own.device) == t]
        if sel.numel():
            out[t], counts[t] = sel.max(), sel.numel()
    return out, counts


def _typed_channel_absmax(x: torch.Tensor, types: torch.Tensor | None) -> torch.Tensor:
    """x [M, K] -> absmax per type and input channel [3, K] (NaN where a type is unseen)."""
    out = _nan(N_TOKEN_TYPES, x.shape[-1])
    if x.shape[0] == 0:
        return out
    if types is None:
        ch = x.detach().abs().amax(0).float()  # [K]
        for t in _STATIC_TYPES:
            out[t] = ch
        return out
    for t in range(N_TOKEN_TYPES):
        sel = x[types.to(x.device) == t]
        if sel.shape[0]:
            out[t] = sel.detach().abs().amax(0).float()
    return out


@dataclass
class ExpertStats:
    """Per-expert ranges of one experts module."""

    gate_up_absmax: torch.Tensor  # [E, 3]
    down_absmax: torch.Tensor  # [E, 3]
    tokens: torch.Tensor  # [E] calibration tokens routed to each expert
    pooled_gate_up: torch.Tensor  # [3]
    pooled_down: torch.Tensor  # [3]

    def starved(self, min_tokens: int) -> list[int]:
        return [e for e, n in enumerate(self.tokens.tolist()) if n < min_tokens]


@dataclass
class Calibration:
    """Activation ranges of a float model, keyed by module name."""

    linears: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> absmax [3]
    linear_tokens: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> tokens [3]
    linear_channels: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> absmax [3, K]
    experts: dict[str, ExpertStats] = field(default_factory=dict)
    hessians: Hessians | None = None  # 2·XᵀX/T per Linear (calibrate(hessians=True)): GPTQ's input

    def apply(self, model: nn.Module, expert_calibration: bool = True, min_expert_tokens: int = 8) -> dict[str, list[int]]:
        """Write static ranges into the quantized modules; returns starved experts per module."""
        from lagoon.quant.experts import QuantizedExperts
        from lagoon.quant.linear import QuantizedLinear

        starved: dict[str, list[int]] = {}
        mods = dict(model.named_modules())
        for name, absmax in self.linears.items():
            m = mods.get(name)
            if isinstance(m, QuantizedLinear):
                chans = self.linear_channels.get(name)
                for t in _STATIC_TYPES:
                    if m.smooth is not None and chans is not None:
                        m.act_absmax[t] = (chans[t] / m.smooth.float()).max()  # NaN stays NaN
                    else:
                        m.act_absmax[t] = absmax[t]
        for name, st in self.experts.items():
            m = mods.get(name)
            if not isinstance(m, QuantizedExperts):
                continue
            if not expert_calibration:
                for t in _STATIC_TYPES:
                    m.gate_up_act_absmax[:, t] = st.pooled_gate_up[t]
                    m.down_act_absmax[:, t] = st.pooled_down[t]
                continue
            low = st.starved(min_expert_tokens)
            ok = torch.ones(m.num_experts, dtype=torch.bool)
            ok[low] = False
            for t in _STATIC_TYPES:
                m.gate_up_act_absmax[ok, t] = st.gate_up_absmax[ok, t]
                m.down_act_absmax[ok, t] = st.down_absmax[ok, t]
            if low:
                starved[name] = low
                log.warning(
                    "%s: experts %s saw fewer than %d calibration tokens; they use dynamic scales "
                    "(give more or more varied calibration text)", name, low, min_expert_tokens,
                )
        return starved

    def summary(self, min_expert_tokens: int = 8) -> dict[str, Any]:
        return {
            "linears": len(self.linears),
            "experts": {
                n: {"tokens": st.tokens.tolist(), "starved": st.starved(min_expert_tokens)} for n, st in self.experts.items()
            },
        }


def _is_experts(m: nn.Module) -> bool:
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(gu, torch.Tensor) and isinstance(dn, torch.Tensor) and gu.dim() == 3 and dn.dim() == 3


@torch.no_grad()
def calibrate(
    model: nn.Module,
    batches: Iterable[torch.Tensor | tuple[torch.Tensor, torch.Tensor]],
    forward: Callable[[nn.Module, torch.Tensor], Any] | None = None,
    hessians: bool = False,
) -> Calibration:
    """Run `batches` (token ids [B, T], or (ids, token types [B*T])) through `model`; collect ranges
    (and with `hessians`, each Linear's input Hessian for GPTQ, routers and gates excepted)."""
    from lagoon.quant.gptq import Hessians
    from lagoon.quant.policy import token_types
    from lagoon.quant.quantize import is_router_name

    cal = Calibration(hessians=Hessians() if hessians else None)
    handles = []

    def linear_hook(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].reshape(-1, args[0].shape[-1])  # [M, K]
            a, n = _typed_absmax(x, current_token_types(x.shape[0]))
            cal.linears[name] = _merge_max(cal.linears.get(name, _nan(N_TOKEN_TYPES)), a)
            cal.linear_tokens[name] = cal.linear_tokens.get(name, torch.zeros(N_TOKEN_TYPES, dtype=torch.long)) + n
            ch = _typed_channel_absmax(x, current_token_types(x.shape[0]))
            cal.linear_channels[name] = _merge_max(cal.linear_channels.get(name, torch.full_like(ch, float("nan"))), ch)

        return hook

    def experts_hook(name: str) -> Callable[..., None]:
        def hook(mod: nn.Module, args: tuple[Any, ...]) -> None:
            x, indices = args[0], args[1]  # [T, H], [T, k]
            e_n = mod.gate_up_proj.shape[0]
            st = cal.experts.get(name) or ExpertStats(
                _nan(e_n, N_TOKEN_TYPES), _nan(e_n, N_TOKEN_TYPES), torch.zeros(e_n, dtype=torch.long),
                _nan(N_TOKEN_TYPES), _nan(N_TOKEN_TYPES),
            )
            types = current_token_types(x.shape[0])
            act = getattr(mod, "act_fn", None) or torch.nn.functional.silu
            st.pooled_gate_up = _merge_max(st.pooled_gate_up, _typed_absmax(x, types)[0])
            for e in range(e_n):
                tok = (indices == e).any(-1).nonzero().squeeze(-1)  # tokens routed to e
                if tok.numel() == 0:
                    continue
                xe, te = x[tok].float(), None if types is None else types[tok]
                gate, up = (xe @ mod.gate_up_proj[e].float().t()).chunk(2, dim=-1)  # [n, I]
                h = act(gate) * up
                st.gate_up_absmax[e] = _merge_max(st.gate_up_absmax[e], _typed_absmax(xe, te)[0])
                hd = _typed_absmax(h, te)[0]
                st.down_absmax[e] = _merge_max(st.down_absmax[e], hd)
                st.pooled_down = _merge_max(st.pooled_down, hd)
                st.tokens[e] += tok.numel()
            cal.experts[name] = st

        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_pre_hook(linear_hook(name)))
        elif _is_experts(m):
            handles.append(m.register_forward_pre_hook(experts_hook(name)))
    if cal.hessians is not None:
        cal.hessians.attach(model, lambda name, m: not is_router_name(name))
    run = forward or (lambda mdl, ids: mdl(ids))
    try:
        for batch in batches:
            ids, types = batch if isinstance(batch, tuple) else (batch, None)
            with token_types(types):
                run(model, ids)
    finally:
        for h in handles:
            h.remove()
        if cal.hessians is not None:
            cal.hessians.detach()
    return cal
