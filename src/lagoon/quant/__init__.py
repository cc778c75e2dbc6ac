"""Quantization: swap a model's layers for int8 / w8a8 / int4 / fp8 ones, from outside the model.

    from lagoon.quant import QuantConfig, quantize_, calibrate
    cal = calibrate(model, batches)                       # optional: static activation ranges
    report = quantize_(model, QuantConfig(scheme="w8a8"), calibration=cal)
    save_quantized(model, "out/"); load_quantized(fresh_float_model, "out/")

Pieces:

- `quantize` — `quantize_`, `QuantConfig`, the scheme registry (`SCHEMES`) and profile map.
- one file per scheme — `int8` (weight-only, int8pack kernel), `w8a8` (`_int_mm`, per-token
  activations), `int4` (group-wise, int4pack kernel), `fp8` (e4m3; `_scaled_mm` on CUDA), `bf16`.
- `linear.QuantizedLinear`, `experts.QuantizedExperts` (stacked MoE experts), `embedding`.
- `policy` — token types (the engine tags prompt tokens by source message, generated tokens as
  reasoning) and the `dynamic_threshold` rule; `calibrate` — per-layer, per-channel and per-expert
  ranges, starved experts; `smooth` — SmoothQuant factors for w8a8 / fp8; `fidelity` — SQNR per layer / expert, KL, top-1, perplexity;
  `checkpoint` — safetensors + quant.json.

Routers and gates are never quantized by default. Not here: the MoE dispatch (`lagoon.moe`) or the
model (`lagoon.model`); quantization never edits them, it replaces their modules.

The names below are imported on first use (PEP 562): the engine imports `lagoon.quant.policy` on
every start, and the package's other modules (the MoE experts among them) are ~45 ms it never needs.
"""

import typing

from lagoon.lazy import lazy_names

if typing.TYPE_CHECKING:
    from lagoon.quant.calibrate import Calibration, calibrate
    from lagoon.quant.checkpoint import load_quantized, read_metadata, save_quantized
    from lagoon.quant.experts import QuantizedExperts
    from lagoon.quant.linear import QuantizedLinear
    from lagoon.quant.policy import TokenType, token_types
    from lagoon.quant.quantize import (
        PROFILES,
        SCHEMES,
        QuantConfig,
        QuantReport,
        get_scheme,
        quantize_,
        scheme_for_profile,
    )

_HOME = {
    "Calibration": "calibrate", "calibrate": "calibrate",
    "load_quantized": "checkpoint", "read_metadata": "checkpoint", "save_quantized": "checkpoint",
    "QuantizedExperts": "experts", "QuantizedLinear": "linear", "TokenType": "policy", "token_types": "policy",
    "PROFILES": "quantize", "SCHEMES": "quantize", "QuantConfig": "quantize", "QuantReport": "quantize",
    "get_scheme": "quantize", "quantize_": "quantize", "scheme_for_profile": "quantize",
}


__getattr__, __dir__ = lazy_names(__name__, _HOME)


__all__ = [
    "PROFILES",
    "SCHEMES",
    "Calibration",
    "QuantConfig",
    "QuantReport",
    "QuantizedExperts",
    "QuantizedLinear",
    "TokenType",
    "calibrate",
    "get_scheme",
    "load_quantized",
    "quantize_",
    "read_metadata",
    "save_quantized",
    "scheme_for_profile",
    "token_types",
]
