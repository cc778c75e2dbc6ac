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
SmoothQuant factors (`lagoon.quant.smooth`); int4 Linears are rounded by GPTQ (`lagoon.quant.gptq`)
when the calibration carries Hessians and `gptq` is on. Without a calibration they scale every activation dynamically
and `QuantReport.calibrated` is False (logged: an uncalibrated w8a8 loses measurably more). `keep` lists name patterns (regular expressions,
searched) left in float — the sensitive layers a fidelity report points at.
Group size (grouped schemes, e.g. int4): `group_size` is the largest tried; each layer takes the
largest of the scheme's `GROUP_SIZES` not above it that divides its K (`layer_group_size`), so a
576-wide layer gets 64 where a 1536-wide one keeps 128. A layer no group size divides stays float
(listed in `QuantReport.kept` with the reason), or, for int8, takes per-channel scales (group 0). The checkpoint records each module's group size.
Tied embeddings: when `lm_head` shares its weight with the embedding, quantizing one leaves the
other as it was.
"""

from __future__ import annotations

import importlib
import logging
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

__all__ = [
    "QuantConfig", "QuantReport", "SCHEMES", "PROFILES", "get_scheme", "scheme_class", "scheme_for_profile", "quantize_",
    "is_router_name", "layer_group_size",
]

SCHEMES: dict[str, str] = {
    "int8": "lagoon.quant.int8:Int8WeightOnly",
    "w8a8": "lagoon.quant.w8a8:W8A8",
    "int4": "lagoon.quant.int4:Int4WeightOnly",
    "fp8": "lagoon.quant.fp8:Fp8",
    "bf16": "lagoon.quant.bf16:Bf16Weights",
}

log = logging.getLogger(__name__)

PROFILES: dict[str, str | None] = {"FP16": None, "BF16": "bf16", "INT8": "int8", "W8A8": "w8a8", "FP8": "fp8", "INT4": "int4"}

_ROUTER_RE = re.compile(r"(^|\.)(router|gate)(\.|$)|_gate$")


def is_router_name(name: str) -> bool:
    """True for routers and gates of MoE blocks (kept unquantized)."""
    return bool(_ROUTER_RE.search(name))


def scheme_class(name: str) -> type[WeightScheme]:
    """The class of the scheme called `name`; QuantizationError lists the valid names."""
    try:
        mod, cls = SCHEMES[name].split(":")
    except KeyError:
        raise QuantizationError(f"unknown quantization scheme {name!r}; valid: {', '.join(SCHEMES)}") from None
    return getattr(importlib.import_module(mod), cls)


def get_scheme(name: str, group_size: int | None = None) -> WeightScheme:
    """The scheme called `name` (group size: the scheme's default when None)."""
    cls = scheme_class(name)
    return cls(cls.DEFAULT_GROUP_SIZE if group_size is None else group_size)


def layer_group_size(scheme: str, k: int, preferred: int | None = None, n: int | None = None) -> int | None:
    """Group size for a layer with `k` inputs (and `n` outputs): the largest of the scheme's sizes
    not above `preferred` (default: the scheme's) that divides `k`; none fits either when none
    divides or when `n` is not a multiple of the grouped layout's `GROUP_N_MULTIPLE`. Then 0 (per
    output channel) for schemes that have it, else None. Ungrouped schemes return `preferred`."""
    cls = scheme_class(scheme)
    top = cls.DEFAULT_GROUP_SIZE if preferred is None else preferred
    if not cls.GROUP_SIZES or top == 0:
        return top
    n_ok = n is None or n % cls.GROUP_N_MULTIPLE == 0
    fits = [g for g in cls.GROUP_SIZES if g <= top and k % g == 0 and n_ok]
    return max(fits) if fits else 0 if cls.PER_CHANNEL else None  # 0: per output channel


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
    group_size: int | None = None  # grouped schemes: the largest group tried per layer (None = the scheme's default)
    dynamic_threshold: float = 0.75  # see lagoon.quant.policy
    include_lm_head: bool = False
    include_embeddings: bool = False
    expert_calibration: bool = True  # per-expert static ranges; False pools one range per experts module
    min_expert_tokens: int = 8  # calibration tokens an expert needs for a static range
    smooth_alpha: float = 0.5  # SmoothQuant migration strength (w8a8/fp8 with a calibration); 0 = off
    gptq: bool = True  # int4 Linears with a calibration that has Hessians: GPTQ rounding (False: round to nearest)
    keep: tuple[str, ...] = ()  # regexes of module names to leave unquantized

    def __post_init__(self) -> None:
        if self.scheme not in SCHEMES:
            raise QuantizationError(f"unknown quantization scheme {self.scheme!r}; valid: {', '.join(SCHEMES)}")
        cls = scheme_class(self.scheme)
        sizes = cls.GROUP_SIZES + ((0,) if cls.PER_CHANNEL else ())
        if cls.GROUP_SIZES and self.group_size is not None and self.group_size not in sizes:
            raise QuantizationError(
                f"{self.scheme} group_size {self.group_size} is not supported; use one of {sizes} (or leave it unset: "
                "each layer then takes the largest that divides it)"
            )
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
    calibrated: bool = False  # a Calibration set static ranges (and SmoothQuant factors, if enabled)
    gptq: list[str] = field(default_factory=list)  # Linears rounded by GPTQ


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
    from lagoon.quant.gptq import gptq_int4
    from lagoon.quant.int4 import Int4WeightOnly
    from lagoon.quant.linear import QuantizedLinear
    from lagoon.quant.smooth import smoothing_factors

    schemes: dict[int | None, WeightScheme] = {}

    def scheme_for(k: int, n: int) -> WeightScheme | None:
        gs = layer_group_size(config.scheme, k, config.group_size, n)
        if gs is None:
            return None
        if gs not in schemes:
            schemes[gs] = get_scheme(config.scheme, gs)
        return schemes[gs]

    report = QuantReport(config, calibrated=calibration is not None)
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
        elif (kn := _unfit(m, scheme_for)) is not None:
            cls = scheme_class(config.scheme)
            report.kept[name] = (
                f"{config.scheme}: [N={kn[1]}, K={kn[0]}] needs K a multiple of one of {cls.GROUP_SIZES} and N of "
                f"{cls.GROUP_N_MULTIPLE} (left float; int8 takes any shape)"
            )
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
            if scheme_class(config.scheme).activation_quantized and config.smooth_alpha > 0 and calibration is not None:
                chans = calibration.linear_channels.get(name)
                if chans is not None:
                    smooth = smoothing_factors(chans, m.weight, config.smooth_alpha)
            scheme = _fit(scheme_for, m.in_features, m.out_features)
            h = calibration.hessians.get(name) if calibration is not None and calibration.hessians is not None else None
            if config.gptq and h is not None and isinstance(scheme, Int4WeightOnly):
                tensors = gptq_int4(m.weight.detach().float(), h, scheme)
                new = QuantizedLinear(scheme, tensors, m.in_features, m.out_features, m.bias, config.dynamic_threshold)
                report.gptq.append(name)
            else:
                new = QuantizedLinear.from_float(m, scheme, config.dynamic_threshold, smooth)
        else:
            _, two_i, hidden = m.gate_up_proj.shape
            new = QuantizedExperts.from_float(
                m, _fit(scheme_for, hidden, two_i), config.dynamic_threshold, down_scheme=_fit(scheme_for, two_i // 2, hidden)
            )
        _set_module(model, name, new)
        report.swapped[name] = type(new).__name__
    if calibration is None and scheme_class(config.scheme).activation_quantized:
        log.warning(
            "%s without a calibration: every activation is scaled dynamically per token, no SmoothQuant "
            "(uncalibrated; pass a Calibration from lagoon.quant.calibrate for static ranges)", config.scheme,
        )
    if calibration is not None:
        calibration.apply(model, expert_calibration=config.expert_calibration, min_expert_tokens=config.min_expert_tokens)
    model.lagoon_quant = config  # type: ignore[assignment]  # read by save_quantized
    return report


def _unfit(m: nn.Module, scheme_for: Callable[[int, int], WeightScheme | None]) -> tuple[int, int] | None:
    """The first (K, N) of `m`'s matrices that no group size of the scheme fits (None: all fit)."""
    if isinstance(m, nn.Linear):
        kns = [(m.in_features, m.out_features)]
    elif _is_experts(m):
        _, two_i, hidden = m.gate_up_proj.shape
        kns = [(hidden, two_i), (two_i // 2, hidden)]
    else:
        return None
    return next((kn for kn in kns if scheme_for(*kn) is None), None)


def _fit(scheme_for: Callable[[int, int], WeightScheme | None], k: int, n: int) -> WeightScheme:
    s = scheme_for(k, n)
    assert s is not None, "target selection keeps layers no group size fits"
    return s


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
