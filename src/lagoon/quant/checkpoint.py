"""Save and load a quantized model: ``model.safetensors`` + ``quant.json``.

``quant.json`` (format_version 1) records the scheme and the whole `QuantConfig`, every swapped
module with its type, tied tensors (stored once, listed under ``aliases``), the int4 packing layout when int4 is used, each module's group size for grouped schemes
(``group_sizes``: ``name`` for a Linear, ``name.gate_up`` / ``name.down`` for experts), the torch version, and the
`source` the float model came from. The scheme is always read from this file, never guessed from a
file name.

Loading needs the float model's architecture (the caller builds it — from its source, on any
device): `load_quantized(model, dir)` swaps exactly the modules listed in ``quant.json`` for
quantized ones of the recorded scheme, then loads the tensors strictly, so a missing, extra or
mis-shaped tensor is an error naming it. Both files are written to a temporary folder that is
renamed into place, so a crash never leaves half a checkpoint.

Not a float checkpoint format: float models are loaded by `lagoon.engine.checkpoint`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from lagoon.errors import CheckpointError, QuantizationError
from lagoon.quant.quantize import QuantConfig, get_scheme

if TYPE_CHECKING:
    from lagoon.quant.linear import WeightScheme

__all__ = ["save_quantized", "load_quantized", "read_metadata", "FORMAT_VERSION", "WEIGHTS", "METADATA"]

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
METADATA = "quant.json"


def _quantized_modules(model: nn.Module) -> dict[str, str]:
    from lagoon.quant.embedding import QuantizedEmbedding
    from lagoon.quant.experts import QuantizedExperts
    from lagoon.quant.linear import QuantizedLinear

    kinds = (QuantizedLinear, QuantizedExperts, QuantizedEmbedding)
    return {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, kinds)}


def _group_sizes(model: nn.Module) -> dict[str, int]:
    """Per-module group sizes of grouped schemes (int4): what `load_quantized` rebuilds with."""
    from lagoon.quant.experts import QuantizedExperts
    from lagoon.quant.linear import QuantizedLinear

    out: dict[str, int] = {}
    for n, m in model.named_modules():
        if isinstance(m, QuantizedLinear) and m.scheme.GROUP_SIZES:
            out[n] = m.scheme.group_size  # 0 = per output channel (int8)
        elif isinstance(m, QuantizedExperts) and m.scheme.GROUP_SIZES:
            out.update({f"{n}.{p}": s.group_size for p, s in m.schemes.items()})
    return out


def _flat_state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict as standalone contiguous tensors; tied entries become aliases (name -> kept name)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for k, v in model.state_dict().items():
        key = (v.data_ptr(), tuple(v.shape), v.stride(), v.dtype)
        if key in seen and v.numel():
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().contiguous().clone()  # views of one loaded buffer must not share storage
    return tensors, aliases


def save_quantized(model: nn.Module, out_dir: str | Path, *, source: str | None = None, extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (after `quantize_`) to `out_dir`; returns the folder."""
    config: QuantConfig | None = getattr(model, "lagoon_quant", None)
    modules = _quantized_modules(model)
    if config is None or not modules:
        raise QuantizationError("this model is not quantized; run lagoon.quant.quantize_ on it before saving")
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "scheme": config.scheme,
        "config": config.to_dict(),
        "modules": modules,
        "group_sizes": _group_sizes(model),
        "torch": torch.__version__,
        "source": source,
        **(extra or {}),
    }
    if config.scheme == "int4" or any(meta["group_sizes"].values()):  # grouped int8 packs its nibbles as int4
        from lagoon.quant.int4 import LAYOUT

        meta["int4_layout"] = LAYOUT
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors, aliases = _flat_state(model)
        meta["aliases"] = aliases
        save_file(tensors, str(tmp / WEIGHTS), metadata={"lagoon_quant_scheme": config.scheme})
        (tmp / METADATA).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The parsed ``quant.json`` of a quantized checkpoint folder (CheckpointError if absent/bad)."""
    f = Path(path) / METADATA
    if not f.is_file():
        raise CheckpointError(f"{path} is not a Lagoon quantized checkpoint: {METADATA} is missing (write one with `lagoon quantize`)")
    try:
        meta = json.loads(f.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{f} is not valid JSON ({exc}); re-run `lagoon quantize`") from exc
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{f} has format_version {meta.get('format_version')!r}; this Lagoon reads {FORMAT_VERSION}")
    return meta


def load_quantized(model: nn.Module, path: str | Path) -> nn.Module:
    """Quantize `model`'s listed modules per ``quant.json`` and load the saved tensors into it."""
    from lagoon.quant.embedding import QuantizedEmbedding
    from lagoon.quant.experts import QuantizedExperts
    from lagoon.quant.linear import QuantizedLinear
    from lagoon.quant.quantize import _set_module

    meta = read_metadata(path)
    config = QuantConfig(**meta["config"])
    sizes: dict[str, int] = meta.get("group_sizes") or {}
    if config.scheme == "int4" or any(sizes.values()):
        from lagoon.quant.int4 import LAYOUT

        if meta.get("int4_layout") != LAYOUT:
            raise QuantizationError(
                f"{path} packs int4 as {meta.get('int4_layout')!r}; this build runs {LAYOUT!r}. Re-quantize from the float model here"
            )
    legacy = 0 if config.scheme == "int8" and "group_sizes" not in meta else config.group_size  # older files

    def scheme(key: str) -> WeightScheme:
        return get_scheme(config.scheme, sizes.get(key, legacy))

    builders = {
        "QuantizedLinear": lambda n, m: QuantizedLinear.from_float(m, scheme(n), config.dynamic_threshold),
        "QuantizedExperts": lambda n, m: QuantizedExperts.from_float(
            m, scheme(f"{n}.gate_up"), config.dynamic_threshold, down_scheme=scheme(f"{n}.down")
        ),
        "QuantizedEmbedding": lambda n, m: QuantizedEmbedding.from_float(m),
    }
    for name, kind in meta["modules"].items():
        try:
            m = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"{path} quantizes module {name!r}, which this model does not have; wrong base model?") from None
        if kind not in builders:
            raise CheckpointError(f"{path} lists {name!r} as {kind!r}; known kinds: {', '.join(builders)}")
        if type(m).__name__ != kind:
            _set_module(model, name, builders[kind](name, m))
    try:
        state = load_file(str(Path(path) / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"cannot load {Path(path) / WEIGHTS}: {exc}") from exc
    for alias, name in meta.get("aliases", {}).items():
        state[alias] = state[name]
    for name, m in model.named_modules():  # SmoothQuant factors: give the buffer a shape to load into
        if isinstance(m, QuantizedLinear) and f"{name}.smooth" in state and m.smooth is None:
            m.smooth = torch.ones(m.in_features)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise CheckpointError(f"{path} does not match the model: {exc}") from exc
    if unexpected or missing:
        raise CheckpointError(
            f"{path} does not match the model: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}; wrong base model?"
        )
    model.lagoon_quant = config  # type: ignore[assignment]
    return model
