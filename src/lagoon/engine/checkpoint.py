"""Checkpoint loading: a HF folder (config.json + safetensors, single or sharded with an index) or a
`.gguf` file, onto a `Transformer` built on the meta device and filled with `assign=True`.

Every tensor is checked (present, right shape, fully inside its file) before the model is touched,
so a bad checkpoint raises `CheckpointError` naming the tensor and nothing is left half-loaded.
GGUF tensors are dequantized through the `gguf` package; llama-architecture GGUFs store Q and K
rows permuted for interleaved RoPE, which is undone here so one model file serves both formats.

`precision`: `float32` casts everything to fp32; `bfloat16` to bf16; `native` keeps a HF
checkpoint's stored dtype and runs a GGUF at its own bit width where torch has the kernel: Q4_0 /
Q4_1 / Q4_K linears become `gguf_linear.Q4_1Linear` (torch's CPU int4 layout, exact; see
`gguf_blocks`) and Q8_0 linears `gguf_linear.Q8Linear` (two int4 passes, exact) or, where the CPU
runs int8 faster (`lagoon.engine.kernels`), `gguf_linear.Int8Linear`; Q5_0 / Q5_1 / Q2_K / Q3_K /
Q5_K / Q6_K linears (`gguf_blocks.INT8_KINDS`), and a quantized output head (or the Q8_0 embedding
it is tied to), run int8 per channel; everything else runs dequantized in bf16. A `native` GGUF load
is cached repacked (`lagoon.engine.repack_cache`) and memory-mapped from there next time. This
module does *not* download anything.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from lagoon.engine.gguf_blocks import (  # noqa: F401 (the decoders are imported from here too)
    INT8_KINDS,
    dequant_q4_0,
    dequant_q4_1,
    dequant_q4_k,
    dequant_q8_0,
    q4_0_fields,
    q4_1_fields,
    q4_k_fields,
    q8_0_fields,
)
from lagoon.engine.kernels import DENSE_PREFILL_MAX_BYTES, KernelPlan, kernel_plan
from lagoon.engine.mxfp4 import dequant_mxfp4_ggml
from lagoon.errors import CheckpointError, UnsupportedModelError
from lagoon.model.args import ModelArgs
from lagoon.model.meta_init import skip_meta_init
from lagoon.model.transformer import Transformer

__all__ = ["load_checkpoint", "load_hf_folder", "load_gguf", "Precision", "read_safetensors"]

Precision = Literal["native", "float32", "bfloat16"]
PRECISIONS = ("native", "float32", "bfloat16")

_ST_DTYPES = {
    "F64": (torch.float64, 8), "F32": (torch.float32, 4), "F16": (torch.float16, 2),
    "BF16": (torch.bfloat16, 2), "I64": (torch.int64, 8), "I32": (torch.int32, 4),
    "I16": (torch.int16, 2), "I8": (torch.int8, 1), "U8": (torch.uint8, 1), "BOOL": (torch.bool, 1),
}


_MAX_HEADER = 100 * 1024 * 1024  # what the safetensors library itself accepts


@dataclass(frozen=True)
class _StEntry:
    """One tensor of a safetensors header, validated: its bytes lie inside the file and match its shape."""

    name: str
    dtype: torch.dtype
    width: int
    shape: tuple[int, ...]
    begin: int
    end: int


def _check_safetensors(path: Path) -> tuple[int, list[_StEntry]]:
    """Parse and fully validate a safetensors header: (bytes before the data, its tensors).

    Any malformed part (not JSON, not an object, an entry without `dtype`/`shape`/`data_offsets`,
    begin > end, bytes past the end, a shape that does not match its byte range) raises
    `CheckpointError` naming the tensor, so a hostile file never reaches torch."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise CheckpointError(f"{path}: header is cut off (file truncated); re-download or re-save it")
            if n > _MAX_HEADER:
                raise CheckpointError(f"{path}: header of {n} bytes is larger than any real one; re-save the checkpoint")
            header = json.loads(f.read(n))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not a safetensors file ({exc}); re-save the checkpoint") from exc
    if not isinstance(header, dict):
        raise CheckpointError(
            f"{path}: the safetensors header is a JSON {type(header).__name__}, not an object; re-save the checkpoint"
        )
    data_len = size - 8 - n
    entries = [_st_entry(path, name, meta, data_len) for name, meta in header.items() if name != "__metadata__"]
    return 8 + n, entries


def _st_entry(path: Path, name: str, meta: Any, data_len: int) -> _StEntry:
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"tensor {name!r} in {path.name}: {what}; the file is corrupt, re-save the checkpoint")

    if not isinstance(meta, dict):
        raise bad(f"its header entry is a JSON {type(meta).__name__}, not an object")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in meta:
            raise bad(f"its header entry has no {key!r}")
    dtype_name = meta["dtype"]
    if not isinstance(dtype_name, str) or dtype_name not in _ST_DTYPES:
        raise CheckpointError(
            f"tensor {name!r} in {path.name} has unsupported dtype {dtype_name!r}; Lagoon reads {', '.join(_ST_DTYPES)}"
        )
    dtype, width = _ST_DTYPES[dtype_name]
    shape, offsets = meta["shape"], meta["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise bad(f"shape {shape!r} is not a list of non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise bad(f"data_offsets {offsets!r} is not [begin, end] (non-negative integers)")
    begin, end = offsets
    if begin > end:
        raise bad(f"data_offsets begin {begin} is past end {end}")
    if end > data_len:
        raise CheckpointError(
            f"tensor {name!r} in {path.name} needs bytes {begin}..{end} but the file holds {data_len}: "
            "the file is truncated; re-download or re-save it"
        )
    numel = math.prod(shape)
    if numel * width != end - begin:
        raise bad(f"shape {shape} of {dtype_name} needs {numel * width} bytes but data_offsets span {end - begin}")
    return _StEntry(name, dtype, width, tuple(shape), begin, end)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Memory-map one safetensors file into tensors (views of the mapped file, no copy)."""
    n, entries = _check_safetensors(path)
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=path.stat().st_size)
    out: dict[str, torch.Tensor] = {}
    for e in entries:
        numel = (e.end - e.begin) // e.width
        start = n + e.begin
        if numel == 0:
            t = torch.empty(0, dtype=e.dtype)
        elif start % e.width == 0:
            t = torch.tensor([], dtype=e.dtype).set_(storage, start // e.width, (numel,))
        else:  # unaligned (old writers): copy this one tensor
            t = torch.frombuffer(bytearray(bytes(storage[start : n + e.end])), dtype=e.dtype)
        out[e.name] = t.view(e.shape)
    return out


def _hf_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index} is malformed ({exc}); re-save the checkpoint") from exc
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names; re-save the checkpoint")
        files = sorted(set(weight_map.values()))
        for name in files:
            if not (folder / name).is_file():
                holder = next(k for k, v in weight_map.items() if v == name)
                raise CheckpointError(f"shard {name} (holding tensor {holder!r}) is missing from {folder}")
        return [folder / f for f in files]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {folder}")


def _hf_name(name: str) -> str:
    return name[len("model."):] if name.startswith("model.") else name


def load_hf_folder(folder: str | Path, precision: Precision = "native") -> Transformer:
    folder = Path(folder)
    args = ModelArgs.from_folder(folder)
    state: dict[str, torch.Tensor] = {}
    for path in _hf_files(folder):
        for name, t in read_safetensors(path).items():
            state[_hf_name(name)] = t
    if args.is_moe:
        from lagoon.engine.moe_names import hf_moe_state

        state = hf_moe_state(args, state)
    return _assemble(args, state, precision, source=str(folder))


def _cast(t: torch.Tensor, precision: Precision, native: torch.dtype | None) -> torch.Tensor:
    if not t.is_floating_point():
        return t
    if precision == "float32":
        return t.float()
    if precision == "bfloat16":
        return t.to(torch.bfloat16)
    return t if native is None else t.to(native)


def _assemble(
    args: ModelArgs, state: dict[str, torch.Tensor], precision: Precision, *, source: str,
    native: torch.dtype | None = None, show: Callable[[str], str] = repr,
) -> Transformer:
    """`show` names a tensor in errors (a GGUF's own tensor names, not Lagoon's)."""
    if precision not in PRECISIONS:
        raise CheckpointError(f"precision {precision!r} is unknown; choose one of {', '.join(PRECISIONS)}")
    with torch.device("meta"), skip_meta_init():
        model = Transformer(args)
    expected = model.state_dict()
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = [k for k in expected if k not in state]
    if missing:
        raise CheckpointError(
            f"{source}: tensor {show(missing[0])} is missing ({len(missing)} missing in all); "
            "the checkpoint does not match its config.json"
        )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensor {show(unexpected[0])}; the checkpoint does not match config.json")
    for k, ref in expected.items():
        if tuple(state[k].shape) != tuple(ref.shape):
            raise CheckpointError(
                f"{source}: tensor {show(k)} has shape {tuple(state[k].shape)}, the config implies {tuple(ref.shape)}"
            )
    state = {k: _cast(v, precision, native) for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=not args.tie_word_embeddings)
    model.tie_weights()
    model.reset_rope()
    for module in model.modules():  # runtime-only buffers (e.g. a router's selection bias) start at zero
        for bname, buf in list(module.named_buffers(recurse=False)):
            if buf is not None and buf.is_meta:
                setattr(module, bname, torch.zeros(buf.shape, dtype=buf.dtype))
    return model.eval().requires_grad_(False)


# ----------------------------------------------------------------------------------------- GGUF
_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
_GGUF_FAMILIES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def gguf_args(reader: Any) -> ModelArgs:
    def field(key: str, default: Any = None) -> Any:
        f = reader.fields.get(key)
        return default if f is None else f.contents()

    from lagoon.engine.gguf_arch import head_count
    from lagoon.engine.gguf_moe import MOE_ARCHS, moe_config

    arch = field("general.architecture")
    if arch not in _GGUF_FAMILIES and arch not in MOE_ARCHS:
        known = ", ".join([*_GGUF_FAMILIES, *MOE_ARCHS])
        raise UnsupportedModelError(f"GGUF architecture {arch!r} is not supported; Lagoon runs: {known}")
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    n_heads = head_count(arch, "head_count", field(f"{arch}.attention.head_count"))
    dim = int(field(f"{arch}.embedding_length"))
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    # llama.cpp ends generation on any of these (its EOG set): Laguna's turn end </assistant> is eot
    stops = [field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    cfg = {
        "model_type": _GGUF_FAMILIES.get(arch),
        "vocab_size": int(emb.shape[1]),
        "hidden_size": dim,
        "num_hidden_layers": int(field(f"{arch}.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": head_count(arch, "head_count_kv", field(f"{arch}.attention.head_count_kv", n_heads)),
        "head_dim": int(field(f"{arch}.attention.key_length", dim // n_heads)),
        "intermediate_size": int(field(f"{arch}.feed_forward_length", field(f"{arch}.expert_feed_forward_length", 0))),
        "rms_norm_eps": float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(field(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field(f"{arch}.context_length", 4096)),
        "tie_word_embeddings": not has_output,
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": [int(t) for t in dict.fromkeys(stops) if t is not None],
    }
    rot = field(f"{arch}.rope.dimension_count")
    if rot:  # fewer than head_dim: partial rotary (GLM-4.5)
        cfg["partial_rotary_factor"] = int(rot) / cfg["head_dim"]
    mtp = int(field(f"{arch}.nextn_predict_layers", 0) or 0)  # GLM-4.5 counts its MTP blocks in block_count
    cfg["num_hidden_layers"] -= mtp
    cfg.update(moe_config(arch, field))
    from lagoon.engine.gguf_arch import arch_config, rope_parameters

    if rope := rope_parameters(arch, field):
        cfg["rope_parameters"] = {**rope, "rope_theta": cfg["rope_theta"]}
    cfg = arch_config(arch, field, cfg, {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors})
    if arch == "glm4moe":
        cfg["attention_bias"] = any(t.name == "blk.0.attn_q.bias" for t in reader.tensors)
        cfg["use_qk_norm"] = any(t.name == "blk.0.attn_q_norm.weight" for t in reader.tensors)
    return ModelArgs.from_hf_config(cfg)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's converter interleaves each head's two RoPE halves: [h, 2, D/2, M] -> [h, D/2, 2, M]
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_DEQUANT = {"Q8_0": dequant_q8_0, "Q4_1": dequant_q4_1, "Q4_0": dequant_q4_0, "Q4_K": dequant_q4_k,
            "MXFP4": dequant_mxfp4_ggml}
_Q4_FIELDS = {"Q4_0": q4_0_fields, "Q4_1": q4_1_fields, "Q4_K": q4_k_fields}
_FLOAT_TYPES = ("F32", "F16", "BF16", "F64")


def gguf_tensor_name(name: str) -> str | None:
    from lagoon.engine.gguf_arch import ARCH_TENSORS

    if name == "token_embd.weight":
        return "embed_tokens.weight"
    if name == "output_norm.weight":
        return "norm.weight"
    if name == "output.weight":
        return "lm_head.weight"
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in _GGUF_NAMES:
        return f"layers.{parts[1]}.{_GGUF_NAMES[parts[2]]}.{parts[3]}"
    if parts[0] == "blk" and len(parts) == 4 and parts[2] in ARCH_TENSORS:
        return f"layers.{parts[1]}.{ARCH_TENSORS[parts[2]]}.{parts[3]}"
    if parts[0] == "blk" and len(parts) == 4 and parts[2] == "attn_sinks":
        return f"layers.{parts[1]}.self_attn.sinks"  # a bare parameter in transformers and Lagoon
    if parts[0] == "blk" and len(parts) == 4:
        from lagoon.engine.gguf_moe import moe_tensor_name

        return moe_tensor_name(parts)
    return None


def open_gguf(path: str | Path) -> Any:
    import gguf

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} not found")
    from lagoon.engine.gguf_file import GGUFFile, NotQuickReadable

    try:
        try:
            return GGUFFile(path)  # the header without gguf's per-value numpy views (seconds on a big vocabulary)
        except NotQuickReadable:
            return gguf.GGUFReader(str(path))
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{path} cannot be read as GGUF ({exc}); the file is truncated or corrupt") from exc


def load_gguf(path: str | Path, precision: Precision = "native", plan: KernelPlan | None = None) -> Transformer:
    """`native`: Q4_0 / Q4_1 linears stay 4-bit or become int8, and a quantized output head (or the
    quantized embedding it is tied to) runs int8, as `plan` (default: `kernel_plan()`, by CPU) says."""
    native = precision == "native"
    plan = plan or kernel_plan()
    if native:
        from lagoon.engine.repack_cache import load_cached

        cached = load_cached(path, plan)
        if cached is not None:
            return cached  # stored joined (below): mapped as it is, no torch.cat of every q/k/v again
    import gguf  # after the cache: its import (yaml and all, ~0.1 s) is for a cold load only

    reader = open_gguf(path)
    args = gguf_args(reader)
    state: dict[str, torch.Tensor] = {}
    q4: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    q8: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    int8: dict[str, torch.Tensor] = {}
    permuted = reader.fields["general.architecture"].contents() == "llama"  # llama.cpp permutes llama's Q/K
    experts: dict[str, tuple[str, Any, list[int]]] = {}  # kept packed (engine.packed_experts), by Lagoon name
    pack_layers: set[int] = set()
    if native and plan.q4_isa is not None and args.is_moe:
        from lagoon.engine.gguf_moe import packed_expert_layers

        pack_layers = packed_expert_layers(reader.tensors)
    for t in reader.tensors:
        name = gguf_tensor_name(t.name)
        if name is None or (t.name.startswith("blk.") and int(t.name.split(".")[1]) >= args.n_layers):
            continue  # not a model tensor, or a multi-token-prediction block
        kind = t.tensor_type.name
        shape = [int(d) for d in reversed(t.shape)]
        if pack_layers and "_exps.weight" in t.name and int(t.name.split(".")[1]) in pack_layers:
            experts[name] = (kind, t.data, shape)  # the memory map: packed one expert at a time below
            state[name] = torch.empty(shape, dtype=torch.bfloat16, device="meta")
            continue
        low_bit = native and kind in _Q4_FIELDS and name.endswith("_proj.weight")
        to_int8 = native and kind in INT8_KINDS and name.endswith("_proj.weight")
        # torch's int4 packing needs out rows % 16 == 0 (a tiny or MLA projection may not): those run int8
        int4_fits = len(shape) == 2 and shape[0] % 16 == 0 and shape[1] % 32 == 0
        exact8 = to_int8 and kind == "Q8_0" and plan.q8 == "int4pack_x2" and int4_fits
        q4_fits = int4_fits if plan.q4_isa is None else len(shape) == 2 and shape[1] % 32 == 0  # any rows
        if (low_bit and plan.q4 in ("int4pack", "q8act_vnni", "q8act_avx2") and q4_fits) or exact8:
            fields = q8_0_fields if exact8 else _Q4_FIELDS[kind]
            d, m, q = fields(torch.from_numpy(np.array(t.data)).reshape(-1))
            if name.endswith(("q_proj.weight", "k_proj.weight")) and permuted:
                heads = args.n_heads if "q_proj" in name else args.n_kv_heads
                rows, blocks = int(t.shape[1]), int(t.shape[0]) // 32  # un-permute whole rows of blocks
                d, m = (_unpermute(x.reshape(rows, blocks), heads).reshape(-1, 1) for x in (d, m))
                q = _unpermute(q.reshape(rows, blocks * 32), heads).reshape(-1, 32)
            if exact8:
                q8[name] = (d, q)
            else:
                q4[name] = (d, m, q)
            state[name] = torch.empty(shape, dtype=torch.bfloat16, device="meta")  # swapped for a low-bit linear below
            continue
        fast = _DEQUANT.get(kind)
        try:
            if fast is not None:
                w = fast(torch.from_numpy(np.array(t.data)).reshape(-1)).reshape(shape)
            else:
                arr = gguf.quants.dequantize(t.data, t.tensor_type)
                w = torch.from_numpy(np.array(arr, dtype=np.float32)).reshape(shape)
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            raise CheckpointError(f"tensor {t.name!r} in {path}: cannot dequantize {kind} ({exc})") from exc
        if permuted and name.endswith("q_proj.weight"):
            w = _unpermute(w, args.n_heads)
        elif permuted and name.endswith("k_proj.weight"):
            w = _unpermute(w, args.n_kv_heads)
        state[name] = _cast(w, precision, torch.bfloat16)  # now, not in _assemble: f32 copies of every
        if low_bit or to_int8:                              # expert at once would double a big MoE's peak
            int8[name] = w
        if native and kind not in _FLOAT_TYPES and name == "lm_head.weight" or (
                native and kind not in _FLOAT_TYPES and name == "embed_tokens.weight" and args.tie_word_embeddings):
            int8["lm_head.weight"] = w  # the output head at (about) the file's 8-bit width
    if args.is_moe:
        from lagoon.engine.gguf_moe import stack_experts

        state = stack_experts(args, state)
    from lagoon.engine.gguf_arch import join_mla

    state = join_mla(args, state)
    from lagoon.engine.gguf_arch import gguf_name_of

    arch = reader.fields["general.architecture"].contents()
    model = _assemble(args, state, precision, source=str(path), native=torch.bfloat16,
                      show=lambda k: f"{gguf_name_of(k, arch)!r} ({k})")
    if experts:
        from lagoon.engine.gguf_moe import pack_experts

        pack_experts(model, experts, _Q4_FIELDS, plan.q4_isa)
    if q4 or q8 or int8:
        from lagoon.engine.gguf_linear import swap_int8, swap_q4_1, swap_q8

        low_bit = sum(q.numel() for _, _, q in q4.values()) + sum(q.numel() for _, q in q8.values()) + sum(
            w.numel() for k, w in int8.items() if k != "lm_head.weight")
        dense = plan.prefill_dtype if low_bit * plan.prefill_dtype.itemsize <= DENSE_PREFILL_MAX_BYTES else None
        swap_q4_1(model, q4, dense, plan.q4_isa)
        swap_q8(model, q8, dense)
        head = int8.pop("lm_head.weight", None)
        swap_int8(model, int8, dense)
        if head is not None:  # the head sees one row per sequence at prefill (last_only): no dense copy
            swap_int8(model, {"lm_head.weight": head}, act_isa=plan.head_isa)
    if native:
        from lagoon.engine.repack_cache import store

        model = _fuse(model)  # before the repack cache: a warm start maps the joined linears
        store(path, plan, model)
    return model


def _fuse(model: Transformer) -> Transformer:
    from lagoon.engine.gguf_linear import fuse_projections

    fuse_projections(model)
    return model


def load_checkpoint(source: str | Path, precision: Precision = "native") -> Transformer:
    """A HF folder or a .gguf file → an eval-mode `Transformer` on the CPU."""
    p = Path(source)
    if p.is_dir():
        return load_hf_folder(p, precision)
    if p.suffix == ".gguf":
        return load_gguf(p, precision)
    raise CheckpointError(f"{source}: expected a HF checkpoint folder (with config.json) or a .gguf file")
