"""`Footprint`: a loaded model's total and per-token active parameters, and `check_declaration`, which
holds ``model_deployment``'s declared ``architecture`` / ``total_parameters`` / ``active_parameters``
against them.

Counting: every parameter once (tied weights once); routed experts are counted from their shape
(``E × 3 × H × I`` per MoE layer) whether they are resident, offloaded (`lagoon.moe.offload`, whose
weights are not parameters) or quantized. *Active* = total − Σ over MoE layers of (E − k) experts:
what one token touches (embeddings, attention, router, shared experts and k routed experts per
layer), the convention of Mixtral's "12.9B active of 46.7B". Quantized linears (GGUF Q4_1,
`lagoon.quant`) count as ``in_features × out_features`` (+ bias), not by their packed buffers.

Checks: an architecture that disagrees with the model (``moe_sparse`` without MoE layers, or
``dense`` with them) raises `CheckpointError` when the config sets it explicitly, and is a note
(logged at info) when it is only the default. A declared count off by more than ``TOLERANCE`` (10%)
logs a warning (and a telemetry alert); both numbers are always in the report. ``variant`` labels
the report and the telemetry gauges; when it names a known model (`lagoon.model.variants`), its
family, expert count, experts per token and layers are checked against the checkpoint (each
mismatch a warning) and its published parameter counts stand in for undeclared ones. Not here: loading models (`lagoon.engine`) or changing them.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lagoon.errors import CheckpointError, ConfigError
from lagoon.moe.layer import SparseMoE

__all__ = ["Footprint", "DeclarationReport", "count_parameters", "parse_count", "check_declaration", "TOLERANCE"]

log = logging.getLogger("lagoon.moe.footprint")

TOLERANCE = 0.10
_SUFFIX = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


@dataclass(frozen=True)
class Footprint:
    total: int
    active: int
    moe_layers: int
    num_experts: int  # routed experts per MoE layer (the first layer's; 0 when dense)
    top_k: int
    routed_expert_params: int  # all layers

    @property
    def architecture(self) -> str:
        return "moe_sparse" if self.moe_layers else "dense"

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "architecture": self.architecture}


def _experts_dims(experts: nn.Module) -> tuple[int, int, int]:
    e = experts.num_experts
    h = getattr(experts, "hidden_size", None) or experts.hidden_dim
    i = getattr(experts, "intermediate_size", None) or experts.intermediate_dim
    return e, h, i


def count_parameters(model: nn.Module) -> Footprint:
    """Total and per-token active parameters of `model` (see the module docstring)."""
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    for m in model.modules():  # quantized linears (GGUF Q4_1, lagoon.quant) keep packed buffers
        if hasattr(m, "in_features") and hasattr(m, "out_features") and not isinstance(m, nn.Linear):
            bias = getattr(m, "bias", None)
            total += m.in_features * m.out_features + (bias.numel() if isinstance(bias, torch.Tensor) else 0)
            total -= sum(p.numel() for p in m.parameters(recurse=False))
        elif hasattr(m, "num_embeddings") and not isinstance(m, nn.Embedding):  # quantized embedding
            total += m.num_embeddings * m.embedding_dim - sum(p.numel() for p in m.parameters(recurse=False))
    active_cut = routed = 0
    blocks = [m for m in model.modules() if isinstance(m, SparseMoE)]
    for b in blocks:
        e, h, i = _experts_dims(b.experts)
        per_expert = 3 * h * i
        own = sum(p.numel() for p in b.experts.parameters())
        total += e * per_expert - own  # shape-based, whatever the experts' storage
        routed += e * per_expert
        active_cut += (e - b.top_k) * per_expert
    first = blocks[0] if blocks else None
    return Footprint(total=total, active=total - active_cut, moe_layers=len(blocks),
                     num_experts=first.num_experts if first else 0, top_k=first.top_k if first else 0,
                     routed_expert_params=routed)


def parse_count(value: str | float | int | None) -> float | None:
    """'33.4B' → 3.34e10, '3B', '135M', '7K', 1.2e9 → the number; None stays None."""
    if value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMBT]?)\s*", value, re.I)
    if not m:
        raise ConfigError(f"parameter count {value!r} is not a number; write e.g. '33.4B', '3B' or 135000000")
    return float(m.group(1)) * _SUFFIX[m.group(2).upper()]


def _human(n: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.0f}"


@dataclass
class DeclarationReport:
    variant: str
    footprint: Footprint
    declared_architecture: str
    declared_total: float | None
    declared_active: float | None
    warnings: list[str] = field(default_factory=list)  # logged as warnings, telemetry alerts
    notes: list[str] = field(default_factory=list)  # logged at info: a default that does not fit

    def off_by(self, kind: str) -> float | None:
        """Relative difference |actual − declared| / declared of ``total`` or ``active``."""
        declared = self.declared_total if kind == "total" else self.declared_active
        actual = self.footprint.total if kind == "total" else self.footprint.active
        return abs(actual - declared) / declared if declared else None

    def to_json(self) -> dict[str, Any]:
        fp = self.footprint
        out: dict[str, Any] = {
            "variant": self.variant,
            "architecture": {"declared": self.declared_architecture, "actual": fp.architecture,
                             "ok": self.declared_architecture == fp.architecture},
            "moe_layers": fp.moe_layers, "num_experts": fp.num_experts, "top_k": fp.top_k,
            "warnings": list(self.warnings), "notes": list(self.notes),
        }
        for kind, declared, actual in (("total", self.declared_total, fp.total),
                                       ("active", self.declared_active, fp.active)):
            off = self.off_by(kind)
            out[f"{kind}_parameters"] = {"declared": declared, "actual": actual, "off_by": off,
                                         "ok": off is None or off <= TOLERANCE}
        return out


def check_declaration(model: nn.Module, deployment: Any, *, telemetry: Any = None) -> DeclarationReport:
    """Compare ``model_deployment`` (a `ModelDeploymentSection`) with `model`; see the module docstring."""
    from lagoon.model.variants import check_variant, preset

    fp = count_parameters(model)
    known = preset(deployment.variant)
    report = DeclarationReport(
        variant=deployment.variant, footprint=fp, declared_architecture=deployment.architecture,
        declared_total=parse_count(deployment.total_parameters) or (known.total if known else None),
        declared_active=parse_count(deployment.active_parameters) or (known.active if known else None),
    )
    report.warnings.extend(check_variant(deployment.variant, getattr(model, "args", None), fp.num_experts, fp.top_k))
    if deployment.architecture != fp.architecture:
        what = f"{fp.moe_layers} MoE layers of {fp.num_experts} experts" if fp.moe_layers else "no MoE layers"
        msg = (f"model_deployment.architecture is {deployment.architecture!r} but the loaded model has {what}; "
               f"set model_deployment.architecture={fp.architecture} or load a {deployment.architecture} checkpoint")
        if "architecture" in deployment.model_fields_set:
            raise CheckpointError(msg)
        report.notes.append(msg + " (only the default; setting the key makes this an error)")
        log.info("%s", report.notes[-1])
    for kind, key in (("total", "total_parameters"), ("active", "active_parameters")):
        off = report.off_by(kind)
        if off is not None and off > TOLERANCE:
            actual = fp.total if kind == "total" else fp.active
            declared = report.declared_total if kind == "total" else report.declared_active
            report.warnings.append(
                f"model_deployment.{key} declares {_human(declared)} but the loaded model has {_human(actual)} "
                f"(off by {off:.0%}, over {TOLERANCE:.0%}); fix the declaration or load the model it describes"
            )
    for w in report.warnings:
        log.warning("%s", w)
        if telemetry is not None:
            telemetry.alert("model_declaration", w)
    if telemetry is not None:
        for kind, n in (("total", fp.total), ("active", fp.active)):
            telemetry.set("lagoon_model_parameters", float(n), labels={"kind": kind, "variant": report.variant},
                          doc="Parameters of the loaded model: total, and active per token")
    return report
