"""RoPE tables: `RopeSpec` (one table: theta, rotary width, scaling variant) → inverse frequencies and
the cos/sin scale, matching `transformers.modeling_rope_utils` for the variants Lagoon runs.

A model may hold several tables (Laguna: one per layer type); each layer names the one it uses.
Partial rotary (GLM-4.5, Laguna's full-attention layers) rotates only the first `dim` channels of
each head; the rest pass through. This module is *not* attention: `apply_rope` is all it does to q/k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from lagoon.errors import UnsupportedModelError

__all__ = ["RopeSpec", "ROPE_TYPES", "inv_freq", "attention_scaling", "apply_rope", "rope_spec"]

ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    theta: float
    dim: int  # rotated channels per head (head_dim × partial_rotary_factor)
    scaling: tuple[tuple[str, Any], ...] = (("rope_type", "default"),)
    max_position_embeddings: int = 4096

    @property
    def params(self) -> dict[str, Any]:
        return dict(self.scaling)

    @property
    def kind(self) -> str:
        return str(self.params.get("rope_type", "default"))


def rope_spec(params: dict[str, Any] | None, head_dim: int, max_pos: int, default_theta: float = 10000.0) -> RopeSpec:
    """A `RopeSpec` from a HF ``rope_parameters`` / ``rope_scaling`` dict (``type`` or ``rope_type``)."""
    rope = dict(params or {})
    theta = float(rope.pop("rope_theta", default_theta))
    partial = float(rope.pop("partial_rotary_factor", 1.0) or 1.0)
    kind = rope.pop("rope_type", rope.pop("type", "default")) or "default"
    rope.pop("type", None)
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"RoPE type {kind!r} is not supported; Lagoon runs: {', '.join(ROPE_TYPES)}")
    rope["rope_type"] = kind
    scaling = tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in rope.items()))
    return RopeSpec(theta=theta, dim=int(head_dim * partial), scaling=scaling, max_position_embeddings=max_pos)


def inv_freq(spec: RopeSpec) -> torch.Tensor:
    """Inverse frequencies [dim/2] for the table's RoPE variant."""
    d = spec.dim
    inv = 1.0 / (spec.theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rope, kind = spec.params, spec.kind
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(rope["factor"])
    if kind == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_ctx = float(rope["original_max_position_embeddings"])
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(medium, smoothed, scaled)
    # yarn: interpolate the low frequencies by `factor`, keep the high ones, ramp in between
    factor = _yarn_factor(spec)
    old_ctx = float(rope["original_max_position_embeddings"])
    fast, slow = float(rope.get("beta_fast") or 32), float(rope.get("beta_slow") or 1)

    def corr(rot: float) -> float:
        return (d * math.log(old_ctx / (rot * 2 * math.pi))) / (2 * math.log(spec.theta))

    lo, hi = corr(fast), corr(slow)
    if rope.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, d - 1)
    if lo == hi:
        hi += 0.001
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    extrapolate = 1 - ramp
    return (inv / factor) * (1 - extrapolate) + inv * extrapolate


def _yarn_factor(spec: RopeSpec) -> float:
    rope = spec.params
    factor = rope.get("factor")
    if factor is None:
        return spec.max_position_embeddings / float(rope["original_max_position_embeddings"])
    return float(factor)


def attention_scaling(spec: RopeSpec) -> float:
    """The factor cos/sin are multiplied by (YaRN's attention temperature; 1 otherwise)."""
    if spec.kind != "yarn":
        return 1.0
    rope = spec.params
    if rope.get("attention_factor") is not None:
        return float(rope["attention_factor"])
    factor = _yarn_factor(spec)

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    m, m_all = rope.get("mscale"), rope.get("mscale_all_dim")
    if m and m_all:
        return mscale(factor, float(m)) / mscale(factor, float(m_all))
    return mscale(factor)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D]; cos/sin [B, 1, T, R] with R <= D (HF "rotate_half" layout on the first R channels)."""
    r = cos.shape[-1]
    rot, rest = (x, None) if r == x.shape[-1] else (x[..., :r], x[..., r:])
    half = r // 2
    turned = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + turned * sin
    return out if rest is None else torch.cat((out, rest), dim=-1)
