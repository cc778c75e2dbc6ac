"""The repack cache: a GGUF loaded at `native` precision, kept as the tensors its kernels run on, so
the next load memory-maps one safetensors file instead of parsing the GGUF (its 49k-token
vocabulary alone takes seconds) and repacking every weight again.

An entry is ``cache_root()/gguf/<slot>-<key>.safetensors``: the slot hashes the file's resolved path
and the kernel plan (ISA, kernels, prefill dtype); the key adds the file's size and mtime, the
dense-copy budget, torch's version and CPU capability (the int4 packing is torch's) and
`REPACK_FORMAT` (raise it whenever the layout of anything stored changes). Writing an entry deletes
the older ones of its slot and those whose GGUF is gone. An entry holds the model's whole state
(int4-packed weights with their ``scales_and_zeros`` or, for Lagoon's own kernel, its tiles
(`cpu_kernels.Q4_LAYOUT`, in the key), Q8_0's two nibble planes, int8 weights with
their scales, biases, the bf16 embedding and norms) plus the dense prefill copies, every tensor
64-byte aligned, and in its metadata the `ModelArgs` (JSON), the GGUF's path and which linears are
low-bit. Joined q/k/v and gate/up (`gguf_linear.fuse_projections`, run before `store`) are stored
joined, so a warm start maps them as they are instead of concatenating every projection again. Writes are atomic (`lagoon.atomic`); a failed write is logged and the load goes on.

On load the entry is checked before anything is built: the safetensors header (truncation, offsets,
shapes, via `checkpoint._check_safetensors`), the format and key it records, and that every tensor
the rebuilt model needs is there with its shape. Any failure is logged with its reason, the entry is
deleted and the GGUF is loaded afresh. Not detected: flipped bits inside tensor data (a checksum
would read every byte the memory map exists to leave unread). Only models whose every module is
either the plain `Transformer`'s or a `gguf_linear` swap are cached (others, e.g. a future low-bit
expert module, load from the GGUF each time). ``LAGOON_REPACK_CACHE=0`` turns the cache off.
This module does not decide what is low-bit (`lagoon.engine.checkpoint` does).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lagoon.atomic import atomic_path
from lagoon.cache_dir import cache_root
from lagoon.engine.cpu_kernels import Q4_LAYOUT
from lagoon.engine.gguf_linear import (
    FUSED,
    Int8Linear,
    Q4_1Linear,
    Q4ActLinear,
    Q8ActLinear,
    Q8Linear,
    install_fused,
)
from lagoon.engine.kernels import DENSE_PREFILL_MAX_BYTES, KernelPlan
from lagoon.engine.packed_experts import LAYOUTS, PackedExperts
from lagoon.model.args import LayerSpec, ModelArgs
from lagoon.model.meta_init import skip_meta_init
from lagoon.model.rope import RopeSpec
from lagoon.model.transformer import Transformer
from lagoon.moe.experts import StackedExperts

__all__ = ["REPACK_FORMAT", "entry_path", "load_cached", "store", "repack_cache_enabled"]

log = logging.getLogger("lagoon.engine.checkpoint")

REPACK_FORMAT = 5  # 5: joined q/k/v and gate/up (`gguf_linear.FUSED`), 4's entries hold them apart;
# 4: an MoE GGUF's packed experts (engine.packed_experts), 3's entries hold them as bf16
_ALIGN = 64
_PAD = "__pad"
_ST_NAMES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.int64: "I64",
             torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
_META = "lagoon.repack"
_DATACLASSES = {c.__name__: c for c in (ModelArgs, LayerSpec, RopeSpec)}
_KINDS: dict[type, str] = {Q4_1Linear: "q4", Q4ActLinear: "q4x", Q8Linear: "q8", Q8ActLinear: "q8x",
                           Int8Linear: "int8"}


def repack_cache_enabled() -> bool:
    return os.environ.get("LAGOON_REPACK_CACHE", "1").strip().lower() not in ("0", "false", "no", "off")


def _key(path: Path, plan: KernelPlan) -> str:
    st = path.stat()
    parts = [str(path.resolve()), st.st_size, st.st_mtime_ns, dataclasses.asdict(plan), DENSE_PREFILL_MAX_BYTES,
             torch.__version__, torch.backends.cpu.get_cpu_capability(), REPACK_FORMAT, Q4_LAYOUT]
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def entry_path(path: str | Path, plan: KernelPlan) -> Path:
    """Where the entry for `path` loaded under `plan` lives (whether or not it exists)."""
    p = Path(path)
    slot = json.dumps([str(p.resolve()), dataclasses.asdict(plan)], sort_keys=True)  # what a newer entry replaces
    stem = hashlib.sha256(slot.encode()).hexdigest()[:12]
    return cache_root() / "gguf" / f"{stem}-{_key(p, plan)}.safetensors"


# ------------------------------------------------------------------------------ ModelArgs as JSON
def _encode(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {"__dc__": type(v).__name__, **{f.name: _encode(getattr(v, f.name)) for f in dataclasses.fields(v)}}
    if isinstance(v, tuple):
        return {"__t__": [_encode(x) for x in v]}
    if isinstance(v, list):
        return [_encode(x) for x in v]
    if isinstance(v, dict):
        return {"__d__": [[_encode(k), _encode(x)] for k, x in v.items()]}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"cannot record {type(v).__name__} in a repack-cache entry")


def _decode(v: Any) -> Any:
    if isinstance(v, list):
        return [_decode(x) for x in v]
    if not isinstance(v, dict):
        return v
    if "__t__" in v:
        return tuple(_decode(x) for x in v["__t__"])
    if "__d__" in v:
        return {_decode(k): _decode(x) for k, x in v["__d__"]}
    cls = _DATACLASSES[v["__dc__"]]  # only the three argument records, never an arbitrary type
    return cls(**{k: _decode(x) for k, x in v.items() if k != "__dc__"})


# ------------------------------------------------------------------------------------------ store
def _joined(plain: dict[str, nn.Module], name: str) -> list[str] | None:
    """The names of the plain model's linears that `name` joins when it is one of the model's
    `FUSED` linears (an attribute the plain model leaves None); else None."""
    parent, _, leaf = name.rpartition(".")
    owner = plain.get(parent)
    if leaf not in FUSED or owner is None or not hasattr(owner, leaf) or getattr(owner, leaf) is not None:
        return None
    parts = [f"{parent}.{a}" if parent else a for a in FUSED[leaf]]
    return parts if all(isinstance(plain.get(p), nn.Linear) for p in parts) else None


def _swaps(model: nn.Module) -> dict[str, str] | None:
    """{module name: 'q4' | 'q4x' | 'q8' | 'q8x' | 'int8' | 'experts:<gate_up layout>:<down layout>'}
    for each `gguf_linear` swap, joined q/k/v or gate/up (`gguf_linear.FUSED`, always 'q4x') and
    `PackedExperts`, or None when the cache could not rebuild `model`: a module that is neither the
    plain `Transformer`'s own nor such a swap, or a tensor outside the plain model's state and the
    swaps' buffers (say, one a loader attached)."""
    with torch.device("meta"):
        fresh = Transformer(model.args)
    plain = dict(fresh.named_modules())
    swaps: dict[str, str] = {}
    replaced: set[str] = set()  # the plain linears a joined one stands for
    for name, mod in model.named_modules():
        ref = plain.get(name)
        if type(mod) in _KINDS and isinstance(ref, nn.Linear):
            swaps[name] = _KINDS[type(mod)]
        elif isinstance(mod, PackedExperts) and isinstance(ref, StackedExperts):
            swaps[name] = f"experts:{mod.layouts['gate_up']}:{mod.layouts['down']}"
        elif ref is None and type(mod) is Q4ActLinear and (parts := _joined(plain, name)) is not None:
            swaps[name] = "q4x"
            replaced.update(parts)
        elif ref is None or type(ref) is not type(mod):
            return None
    gone = swaps.keys() | replaced
    expected = {k for k in fresh.state_dict() if k.rpartition(".")[0] not in gone}
    for name in swaps:
        expected |= {f"{name}.{b}" for b in model.get_submodule(name).state_dict()}
    return swaps if set(model.state_dict()) == expected else None


def store(path: str | Path, plan: KernelPlan, model: Transformer) -> Path | None:
    """Write `model` (just loaded from `path` under `plan`) as a cache entry; the entry's path, or
    None when the model cannot be cached or the write failed (logged: the load is not affected)."""
    if not repack_cache_enabled():
        return None
    swaps = _swaps(model)
    if swaps is None:
        log.debug("%s: not cached (a module the repack cache cannot rebuild)", path)
        return None
    try:
        args = model.args
        encoded = json.dumps(_encode(args))
        back = _decode(json.loads(encoded))
        if back != args or back.extra != args.extra:  # `extra` is left out of ModelArgs' equality
            log.debug("%s: not cached (its ModelArgs do not round-trip through JSON)", path)
            return None
        tensors = dict(model.state_dict())
        if args.tie_word_embeddings and "lm_head" not in swaps:
            tensors.pop("lm_head.weight", None)  # the same tensor as the embedding; tie_weights restores it
        for name in swaps:
            dense = getattr(model.get_submodule(name), "dense", None)  # Q8ActLinear keeps none
            if dense is not None:
                tensors[f"{name}.dense"] = dense
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        target = entry_path(path, plan)
        meta = {"format": REPACK_FORMAT, "key": target.stem, "source": str(Path(path).resolve()), "args": encoded,
                "swaps": swaps}
        with atomic_path(target, suffix=".safetensors") as tmp:
            _write_aligned(tmp, tensors, {_META: json.dumps(meta)})
        _prune(target)
        return target
    except (OSError, RuntimeError, TypeError, ValueError, KeyError) as exc:  # KeyError: a dtype safetensors lacks
        log.warning("could not write the repack cache for %s (%s); the next load repacks again", path, exc)
        return None


def _write_aligned(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """A safetensors file whose every tensor starts on a 64-byte boundary: torch's int8 matmul
    kernel crashes on a misaligned weight (M >= 4, torch 2.13), and the memory map keeps the file's
    alignment. The gaps are `_PAD` tensors (safetensors forbids holes); `_rebuild` drops them."""
    header: dict[str, Any] = {"__metadata__": metadata}
    order: list[tuple[int, torch.Tensor | None]] = []  # (padding bytes, tensor)
    offset = 0
    for name, t in tensors.items():
        pad = -offset % _ALIGN
        if pad:
            header[f"{_PAD}{len(order)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [offset, offset + pad]}
            order.append((pad, None))
            offset += pad
        n = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        order.append((0, t))
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-(8 + len(blob)) % _ALIGN)  # the data starts aligned too
    with path.open("wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for pad, t in order:
            if t is None:
                f.write(bytes(pad))
            elif t.numel():
                f.write(memoryview(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))


def _prune(kept: Path) -> None:
    """Delete `kept`'s slot's older entries and every entry whose GGUF is gone (reading headers only)."""
    slot = kept.stem.split("-")[0]
    for entry in kept.parent.glob("*.safetensors"):
        if entry == kept:
            continue
        try:
            gone = entry.stem.startswith(slot + "-") or not Path(_read_meta(entry)["source"]).exists()
        except Exception:  # noqa: BLE001 - unreadable: a later load of its GGUF would rebuild it anyway
            gone = True
        if gone:
            entry.unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------- load
class _Stale(Exception):
    """An entry that cannot serve this load (its reason is the message)."""


def load_cached(path: str | Path, plan: KernelPlan) -> Transformer | None:
    """The model `path` held when it was cached under `plan`, from its memory-mapped entry; None on
    a miss, or (logged, entry deleted) when the entry is corrupt or stale."""
    if not repack_cache_enabled():
        return None
    try:
        entry = entry_path(path, plan)
    except OSError:
        return None  # the GGUF itself is unreadable: its loader says why
    if not entry.is_file():
        return None
    try:
        return _rebuild(entry, plan)
    except Exception as exc:  # noqa: BLE001 - any defect of a cache entry means "load the GGUF"; said below
        log.warning("repack cache entry %s is unusable (%s: %s); deleting it and loading %s afresh",
                    entry, type(exc).__name__, exc, path)
        entry.unlink(missing_ok=True)
        return None


def _rebuild(entry: Path, plan: KernelPlan) -> Transformer:
    from lagoon.engine.checkpoint import _assemble, read_safetensors

    meta = _read_meta(entry)
    if meta.get("format") != REPACK_FORMAT or meta.get("key") != entry.stem:
        raise _Stale(f"written as format {meta.get('format')} for key {meta.get('key')}")
    args = _decode(json.loads(meta["args"]))
    if not isinstance(args, ModelArgs):
        raise _Stale("its recorded arguments are not a ModelArgs")
    swaps: dict[str, str] = meta["swaps"]
    state = {k: v for k, v in read_safetensors(entry).items() if not k.startswith(_PAD)}  # mapped, validated
    misaligned = next((k for k, v in state.items() if v.numel() and v.data_ptr() % _ALIGN), None)
    if misaligned is not None:
        raise _Stale(f"tensor {misaligned} is not {_ALIGN}-byte aligned (written by another writer)")
    layers: dict[str, nn.Module] = {}
    with torch.device("meta"), skip_meta_init():
        plain = dict(Transformer(args).named_modules())
    experts: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[str, str], dict[str, torch.Tensor | None]]] = {}
    joined: set[str] = set()
    for name, kind in swaps.items():
        ref = plain.get(name)
        if kind.startswith("experts:") and isinstance(ref, StackedExperts):
            experts[name] = _packed_experts(state, name, kind, ref, plan)
            continue
        parts = _joined(plain, name) if ref is None else None
        if parts is not None and kind == "q4x":  # joined q/k/v or gate/up: rows of each part in order
            N, K = sum(plain[p].out_features for p in parts), plain[parts[0]].in_features
            if any(plain[p].in_features != K for p in parts):
                raise _Stale(f"it joins {name!r} from linears of different inputs")
            for p in parts:  # the plain linears' parameters: placeholders, removed by install_fused
                for leaf, t in plain[p].named_parameters():
                    state[f"{p}.{leaf}"] = torch.empty(t.shape, dtype=torch.bfloat16, device="meta")
            joined.add(name)
        elif not isinstance(ref, nn.Linear) or kind not in _KINDS.values():
            raise _Stale(f"it swaps {name!r} ({kind}), which the model has no linear for")
        else:
            N, K = ref.out_features, ref.in_features
        dense = state.pop(f"{name}.dense", None)
        if dense is not None and tuple(dense.shape) != (N, K):
            raise _Stale(f"{name}.dense has shape {tuple(dense.shape)}, not {(N, K)}")
        if kind == "q4":
            packed, sz = _take(state, name, "packed"), _take(state, name, "scales_and_zeros")
            if tuple(sz.shape) != (K // 32, N, 2):
                raise _Stale(f"{name}.scales_and_zeros has shape {tuple(sz.shape)}, not {(K // 32, N, 2)}")
            layers[name] = Q4_1Linear.from_packed(packed, sz, dense, N, K)
        elif kind == "q4x":
            packed = _take(state, name, "packed")
            if plan.q4_isa is None or tuple(packed.shape) != (-(-N // 16), K // 32, 320):
                raise _Stale(f"{name}.packed has shape {tuple(packed.shape)} under plan {plan.q4}")
            layers[name] = Q4ActLinear.from_packed(packed, dense, N, K, plan.q4_isa)
        elif kind == "q8x":
            packed = _take(state, name, "packed")
            if plan.head_isa is None or tuple(packed.shape) != (-(-N // 16), K // 32, 576):
                raise _Stale(f"{name}.packed has shape {tuple(packed.shape)} under plan {plan.head}")
            layers[name] = Q8ActLinear.from_packed(packed, N, K, plan.head_isa)
        elif kind == "q8":
            hi, lo, sz = (_take(state, name, b) for b in ("packed_hi", "packed_lo", "scales_and_zeros"))
            if tuple(sz.shape) != (K // 32, N, 2):
                raise _Stale(f"{name}.scales_and_zeros has shape {tuple(sz.shape)}, not {(K // 32, N, 2)}")
            layers[name] = Q8Linear.from_packed(hi, lo, sz, dense, N, K)
        else:
            qweight, scale = _take(state, name, "qweight"), _take(state, name, "scale")
            if tuple(qweight.shape) != (N, K) or tuple(scale.shape) != (N,):
                raise _Stale(f"{name} holds int8 weights of shape {tuple(qweight.shape)}, not {(N, K)}")
            layers[name] = Int8Linear.from_buffers(qweight, scale, dense)
        if name in joined:  # never biased (`gguf_linear._fused`); the plain model has no such linear
            continue
        layers[name].bias = state.get(f"{name}.bias")  # also loaded into the plain linear, then dropped
        state[f"{name}.weight"] = torch.empty((N, K), dtype=torch.bfloat16, device="meta")  # swapped out below
    model = _assemble(args, state, "native", source=str(entry), native=torch.bfloat16)
    for name, layer in layers.items():
        parent, _, leaf = name.rpartition(".")
        if name in joined:  # as `fuse_projections` does it: the same modules in the same order
            install_fused(model.get_submodule(parent), leaf, layer)
        else:
            setattr(model.get_submodule(parent), leaf, layer)
    for name, (gate_up, down, layouts, bias) in experts.items():
        parent, _, leaf = name.rpartition(".")
        old = model.get_submodule(name)  # the float experts, on meta: their GLU and sizes
        setattr(model.get_submodule(parent), leaf, PackedExperts(
            gate_up, down, layouts, old.hidden_size, old.intermediate_size, plan.q4_isa, old.glu, **bias))
    return model


def _packed_experts(state: dict[str, torch.Tensor], name: str, kind: str, ref: StackedExperts, plan: KernelPlan
                    ) -> tuple[torch.Tensor, torch.Tensor, tuple[str, str], dict[str, torch.Tensor | None]]:
    """`name`'s packed experts from the entry (removed from `state`; meta placeholders for the float
    experts' parameters put in their place), checked against the plain model's shapes and `plan`."""
    layouts = tuple(kind.split(":")[1:])
    if len(layouts) != 2 or not set(layouts) <= set(LAYOUTS) or plan.q4_isa is None:
        raise _Stale(f"it keeps {name} as {kind}, which plan {plan.q4} cannot run")
    gate_up, down = _take(state, name, "gate_up_packed"), _take(state, name, "down_packed")
    e, h, i = ref.num_experts, ref.hidden_size, ref.intermediate_size
    for t, layout, (rows, cols) in ((gate_up, layouts[0], (2 * i, h)), (down, layouts[1], (h, i))):
        if tuple(t.shape[:3]) != (e, -(-rows // 16), cols // 32) or t.dtype != torch.uint8:
            raise _Stale(f"{name} holds {layout} experts of shape {tuple(t.shape)}, not for {e} x {rows} x {cols}")
    bias = {b: state.pop(f"{name}.{b}", None) for b in ("gate_up_bias", "down_bias")}
    if any((t is None) != (getattr(ref, b) is None) for b, t in bias.items()):
        raise _Stale(f"{name}'s expert biases do not match the model's")
    for leaf, p in ref.named_parameters():  # the float experts' parameters: placeholders, swapped out
        state[f"{name}.{leaf}"] = torch.empty(p.shape, dtype=torch.bfloat16, device="meta")
    return gate_up, down, layouts, bias


def _take(state: dict[str, torch.Tensor], name: str, buf: str) -> torch.Tensor:
    t = state.pop(f"{name}.{buf}", None)
    if t is None:
        raise _Stale(f"tensor {name}.{buf} is missing")
    return t


def _read_meta(entry: Path) -> dict[str, Any]:
    with entry.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > entry.stat().st_size - 8:
            raise _Stale("its header is cut off")
        header = json.loads(f.read(n))
    return json.loads(header["__metadata__"][_META])
