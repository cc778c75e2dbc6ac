"""`quantize_`: the one entry point that swaps a model's layers for quantized ones, in place.

    quantize_(model, QuantConfig(scheme="w8a8"), filter_fn=None, calibration=None) -> QuantReport

What is swapped (qualified module names, so it works on Lagoon's `Transformer` and on HF models):

- every `nn.Linear` → `QuantizedLinear`, except routers and gates: a name with a component
  `router` or `gate`, or a last component ending in `_gate` (`mlp.gate`, `moe.router`,
  `shared_expert_gate`) — routing stays full precision (llm-compressor does the same). Projections
  such as `gate_proj` are quantized. `lm_head` only if `include_lm_head`.
- every stacked experts module (parameters `gate_up_proj [E, 2I, H]`, `down_proj [E, H, I]`) →
  `QuantizedExperts`.
- `nn.Embedding` → `QuantizedEmbedding` only if `include_embeddings`.
- `filter_fn(module, name) -> bool`, when given, must also say yes.

Schemes by short name (`SCHEMES`, imported lazily): int8, w8a8, int4, fp8, bf16. Profiles
(`model_deployment.quantization.profile`) map to schemes with `scheme_for_profile`; FP16 means no
quantization. A `Calibration` (from `lagoon.quant.calibrate`) sets static activation ranges, and for
activation-quantized schemes (w8a8, fp8) with ``smooth_alpha > 0`` it also gives each Linear its
SmoothQuant factors (`lagoon.quant.smooth`). `keep` lists name patterns (regular expressions,
searched) left in float — the sensitive layers a fidelity report points at.
Tied embeddings: when `lm_head` shares its weight with the embedding, quantizing one leaves the
other as it was.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from lagoon.errors import QuantizationError

if TYPE_CHECKING:
    from lagoon.config import QuantizationSection
    from lagoon.quant.calibrate import Calibration
    from lagoon.quant.linear import WeightScheme

__all__ = ["QuantConfig", "QuantReport", "SCHEMES", "PROFILES", "get_scheme", "scheme_for_profile", "quantize_", "is_router_name"]

SCHEMES: dict[str, str] = {
    "int8": "lagoon.quant.int8:Int8WeightOnly",
    "w8a8": "lagoon.quant.w8a8:W8A8",
    "int4": "lagoon.quant.int4:Int4WeightOnly",
    "fp8": "lagoon.quant.fp8:Fp8",
    "bf16": "lagoon.quant.bf16:Bf16Weights",
}

PROFILES: dict[str, str | None] = {"FP16": None, "BF16": "bf16", "INT8": "int8", "W8A8": "w8a8", "FP8": "fp8", "INT4": "int4"}

_ROUTER_RE = re.compile(r"(^|\.)(router|gate)(\.|$)|_gate$")


def is_router_name(name: str) -> bool:
    """True for routers and gates of MoE blocks (kept unquantized)."""
    return bool(_ROUTER_RE.search(name))


def get_scheme(name: str, group_size: int = 128) -> WeightScheme:
    """The scheme called `name`; QuantizationError lists the valid names."""
    try:
        mod, cls = SCHEMES[name].split(":")
    except KeyError:
        raise QuantizationError(f"unknown quantization scheme {name!r}; valid: {', '.join(SCHEMES)}") from None
    return getattr(importlib.import_module(mod), cls)(group_size)


def scheme_for_profile(profile: str) -> str | None:
    """`FP16|BF16|INT8|W8A8|FP8|INT4` -> scheme name (None = leave the weights as they are)."""
    key = str(getattr(profile, "value", profile)).upper()
    if key not in PROFILES:
        raise QuantizationError(f"unknown quantization profile {profile!r}; valid: {', '.join(PROFILES)}")
    return PROFILES[key]


@dataclass(frozen=True)
class QuantConfig:
    """What `quantize_` does. Build from the config section with `from_section`."""

    scheme: str
    group_size: int = 128  # int4 only: 32, 64 or 128
    dynamic_threshold: float = 0.75  # see lagoon.quant.policy
    include_lm_head: bool = False
    include_embeddings: bool = False
    expert_calibration: bool = True  # per-expert static ranges; False pools one range per experts module
    min_expert_tokens: int = 8  # calibration tokens an expert needs for a static range
    smooth_alpha: float = 0.5  # SmoothQuant migration strength (w8a8/fp8 with a calibration); 0 = off
    keep: tuple[str, ...] = ()  # regexes of module names to leave unquantized

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"unknown quantization scheme {self.scheme!r}; valid: {', '.join(SCHEMES)}")
        if self.dynamic_threshold < 0:
            raise QuantizationError("dynamic_threshold must be >= 0 (0 = every token dynamic)")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise QuantizationError(f"smooth_alpha must be in [0, 1] (0 = no SmoothQuant); got {self.smooth_alpha}")
        object.__setattr__(self, "keep", tuple(self.keep))
        for pat in self.keep:
            try:
                re.compile(pat)
            except re.error as exc:
                raise QuantizationError(f"keep pattern {pat!r} is not a valid regular expression ({exc})") from None

    @classmethod
    def from_section(cls, section: QuantizationSection, **overrides: Any) -> QuantConfig | None:
        """From `model_deployment.quantization`; None for the FP16 profile (nothing to do)."""
        scheme = overrides.pop("scheme", None) or scheme_for_profile(section.profile)
        if scheme is None:
            return None
        return cls(
            scheme=scheme,
            dynamic_threshold=section.dynamic_threshold,
            expert_calibration=section.expert_calibration,
            **overrides,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class QuantReport:
    """What `quantize_` swapped (name -> kind) and what it left alone on purpose."""

    config: QuantConfig
    swapped: dict[str, str] = field(default_factory=dict)
    kept: dict[str, str] = field(default_factory=dict)


def _is_experts(m: nn.Module) -> bool:
    gu, dn = getattr(m, "gate_up_proj", None), getattr(m, "down_proj", None)
    return isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter) and gu.dim() == 3 and dn.dim() == 3


def _is_lm_head(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in {"lm_head", "output"}


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    filter_fn: Callable[[nn.Module, str], bool] | None = None,
    calibration: Calibration | None = None,
) -> QuantReport:
    """Swap target modules of `model` in place; returns what was swapped and what was kept."""
    from lagoon.quant.embedding import QuantizedEmbedding
    from lagoon.quant.experts import QuantizedExperts
    from lagoon.quant.linear import QuantizedLinear
    from lagoon.quant.smooth import smoothing_factors

    scheme = get_scheme(config.scheme, config.group_size)
    report = QuantReport(config)
    targets: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if any(name.startswith(t + ".") for t, _ in targets):
            continue  # inside a module already chosen
        if is_router_name(name):
            if isinstance(getattr(m, "weight", None), nn.Parameter):
                report.kept[name] = "router/gate"
            continue
        if not (isinstance(m, (nn.Linear, nn.Embedding)) or _is_experts(m)):
            continue
        elif isinstance(m, nn.Linear) and _is_lm_head(name) and not config.include_lm_head:
            report.kept[name] = "lm_head (include_lm_head=False)"
        elif isinstance(m, nn.Embedding) and not config.include_embeddings:
            report.kept[name] = "embedding (include_embeddings=False)"
        elif filter_fn is not None and not filter_fn(m, name):
            report.kept[name] = "filter_fn"
        elif any(re.search(p, name) for p in config.keep):
            report.kept[name] = "keep"
        else:
            targets.append((name, m))
    if not targets:
        raise QuantizationError(
            "quantize_ found nothing to quantize (no nn.Linear, nn.Embedding or stacked experts outside "
            "routers); check the model and filter_fn"
        )
    for name, m in targets:
        if isinstance(m, nn.Embedding):
            new: nn.Module = QuantizedEmbedding.from_float(m)
        elif isinstance(m, nn.Linear):
            smooth = None
            if scheme.activation_quantized and config.smooth_alpha > 0 and calibration is not None:
                chans = calibration.linear_channels.get(name)
                if chans is not None:
                    smooth = smoothing_factors(chans, m.weight, config.smooth_alpha)
            new = QuantizedLinear.from_float(m, scheme, config.dynamic_threshold, smooth)
        else:
            new = QuantizedExperts.from_float(m, scheme, config.dynamic_threshold)
        _set_module(model, name, new)
        report.swapped[name] = type(new).__name__
    if calibration is not None:
        calibration.apply(model, expert_calibration=config.expert_calibration, min_expert_tokens=config.min_expert_tokens)
    model.lagoon_quant = config  # type: ignore[assignment]  # read by save_quantized
    return report


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
