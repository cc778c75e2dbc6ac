"""What DeepSeek-V2/V3 (``deepseek2``), gpt-oss (``gpt-oss``) and Laguna (``laguna``) GGUFs add to
llama.cpp's llama layout, read back into HF config keys and Lagoon tensor names; and the RoPE
scaling metadata every GGUF architecture shares.

    deepseek2 (multi-head latent attention, `lagoon.model.mla`):
    blk.N.attn_q_a / attn_q_a_norm / attn_q_b (or attn_q)   → self_attn.q_a_proj / q_a_layernorm / q_b_proj (q_proj)
    blk.N.attn_kv_a_mqa / attn_kv_a_norm                    → self_attn.kv_a_proj_with_mqa / kv_a_layernorm
    blk.N.attn_kv_b [H·(N+V), R]                            → self_attn.kv_b_proj
    blk.N.attn_k_b [H, R, N] + attn_v_b [H, V, R] (llama.cpp's split form since its MLA rewrite)
                                                            → self_attn.kv_b_proj, re-joined per head
    attention.q_lora_rank, kv_lora_rank, key_length_mla (N+P), value_length_mla (V), rope.dimension_count (P)
    (files from before the split store key_length = N+P, value_length = V and no *_mla keys)

    gpt-oss:
    blk.N.attn_sinks.weight [H]        → self_attn.sinks
    blk.N.post_attention_norm.weight   → post_attention_layernorm.weight
    attention.sliding_window (+ sliding_window_pattern, else llama.cpp's rule: even layers slide)

    laguna (llama.cpp's conversion/laguna.py and src/models/laguna.cpp):
    attention.head_count [per-layer array] → num_attention_heads_per_layer; head_count_kv, key_length
    attention.sliding_window (absent or 0: every layer full, as Laguna-M.1), and which layers slide:
      sliding_window_pattern as a per-layer bool array, or attention.layer_types strings (some
      files), else the period p (uint32; absent: 4) with layer i full iff i % p == 0 (llama.cpp's
      set_swa_pattern(p, dense_first), XS.2's full/SWA/SWA/SWA)
    rope.freq_base + rope.dimension_count + rope.scaling.* (YaRN) → the full-attention table;
    rope.freq_base_swa (else freq_base) + rope.dimension_count_swa (else dimension_count), never
      scaled → the sliding table
    leading_dense_block_count → mlp_layer_types; expert_shared_feed_forward_length → the shared
      expert; expert_weights_scale → moe_routed_scaling_factor; expert_gating_func must be
      sigmoid (2) and expert_weights_norm true (Laguna's router)
    blk.N.attn_gate.weight [n_head_N or n_head_N·head_dim, H] → self_attn.g_proj: its row count
      says per-head or per-element gating (llama.cpp reads it from the tensor too)
    The router's logit softcap is not in the file (llama.cpp has none): a GGUF runs without it.

llama.cpp converts these without the Q/K row permutation it applies to llama (deepseek2 rotates
interleaved pairs, gpt-oss and laguna halves), so only MLA's kv_b needs re-joining. gpt-oss's clamped SwiGLU
constants are not in the file: llama.cpp and transformers fix them at alpha 1.702, limit 7.0.
This module is *not* the expert side (`lagoon.engine.gguf_moe`) nor the dequantizers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from lagoon.errors import CheckpointError
from lagoon.model.args import ModelArgs

__all__ = ["ARCH_TENSORS", "arch_config", "head_count", "rope_parameters", "join_mla", "gguf_name_of"]

Field = Callable[[str, Any], Any]

ARCH_TENSORS = {  # llama.cpp tensor kind → Lagoon module path, for the kinds only these architectures use
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj", "attn_k_b": "self_attn.gguf_k_b", "attn_v_b": "self_attn.gguf_v_b",
    "post_attention_norm": "post_attention_layernorm", "attn_gate": "self_attn.g_proj",
}
_YARN_LOG_MUL = 0.1  # llama.cpp stores DeepSeek's mscale_all_dim as yarn_log_multiplier = 0.1 · mscale_all_dim


def rope_parameters(arch: str, field: Field) -> dict[str, Any]:
    """HF ``rope_parameters`` (without theta) from ``{arch}.rope.scaling.*``; empty when unscaled."""
    kind = field(f"{arch}.rope.scaling.type", None) or "none"
    factor = float(field(f"{arch}.rope.scaling.factor", 0.0) or 0.0)
    if kind == "none" or (kind == "linear" and factor in (0.0, 1.0)):
        return {}
    if kind == "linear":
        return {"rope_type": "linear", "factor": factor}
    if kind != "yarn":
        raise CheckpointError(f"GGUF {arch}: rope.scaling.type {kind!r} is not supported; Lagoon runs none, linear, yarn")
    orig = field(f"{arch}.rope.scaling.original_context_length", None)
    if orig is None or not factor:
        raise CheckpointError(f"GGUF {arch}: YaRN RoPE needs rope.scaling.factor and "
                              "rope.scaling.original_context_length; the file lacks one")
    out: dict[str, Any] = {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": int(orig)}
    for key, hf in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if (v := field(f"{arch}.rope.scaling.{key}", None)) is not None:
            out[hf] = float(v)
    log_mul = float(field(f"{arch}.rope.scaling.yarn_log_multiplier", 0.0) or 0.0)
    if log_mul:  # DeepSeek: llama.cpp's kernels assume mscale == mscale_all_dim (cos/sin unscaled)
        out["mscale"] = out["mscale_all_dim"] = round(log_mul / _YARN_LOG_MUL, 6)  # undo f32 storage
    if arch == "gpt-oss":
        out["truncate"] = False  # gpt-oss's YaRN ramp is not rounded to whole dims (its HF config says so)
    return out


def head_count(arch: str, key: str, value: Any) -> int:
    """A head count, which llama.cpp may store per layer: Laguna's query heads vary (`_laguna` reads
    the array); elsewhere a per-layer array must hold one value."""
    if not isinstance(value, list):
        return int(value)
    if not value or (len(set(value)) > 1 and not (arch == "laguna" and key == "head_count")):
        raise CheckpointError(f"GGUF {arch}: attention.{key} varies by layer ({value}); Lagoon runs one value "
                              "per model for this architecture")
    return int(value[0])


def arch_config(arch: str, field: Field, cfg: dict[str, Any], tensors: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """`cfg` (the shared GGUF keys) completed for `arch`; unchanged for the other architectures.
    `tensors`: every tensor's name → its shape in torch order (out, in)."""
    if arch == "deepseek2":
        return _deepseek2(field, cfg, tensors)
    if arch == "gpt-oss":
        return _gpt_oss(field, cfg)
    if arch == "laguna":
        return _laguna(field, cfg, tensors)
    return cfg


def _deepseek2(field: Field, cfg: dict[str, Any], tensors: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    a = "deepseek2"
    rope = field(f"{a}.rope.dimension_count", None)
    rank = field(f"{a}.attention.kv_lora_rank", None)
    if rope is None or rank is None:
        raise CheckpointError(f"GGUF {a}: rope.dimension_count and attention.kv_lora_rank are required for "
                              "multi-head latent attention; the file lacks one")
    rope, rank = int(rope), int(rank)
    qk = field(f"{a}.attention.key_length_mla", None)
    v = field(f"{a}.attention.value_length_mla", None)
    if qk is None:  # written before llama.cpp's MLA rewrite: key/value_length are the per-head widths
        qk, v = field(f"{a}.attention.key_length", None), field(f"{a}.attention.value_length", None)
    if qk is None or v is None:
        raise CheckpointError(f"GGUF {a}: attention.key_length(_mla) / value_length(_mla) are missing")
    out = {k: x for k, x in cfg.items() if k != "partial_rotary_factor"}  # the rope dims are qk_rope_head_dim
    softmax = cfg.get("scoring_func") == "softmax"  # DeepSeek-V2 / V2.5 / V2-Lite (`lagoon.engine.gguf_moe`)
    out.update(
        model_type="deepseek_v2" if softmax else "deepseek_v3",
        num_key_value_heads=cfg["num_attention_heads"],  # llama.cpp writes 1 (one latent); HF counts heads
        q_lora_rank=int(field(f"{a}.attention.q_lora_rank", 0) or 0),
        kv_lora_rank=rank, qk_rope_head_dim=rope, qk_nope_head_dim=int(qk) - rope, v_head_dim=int(v),
        rope_interleave=True,  # llama.cpp rotates deepseek2's stored (x0, x1) pairs, as DeepSeek does
    )
    if softmax:  # V2 with groups is group-limited greedy, without them plain greedy (V2-Lite)
        out["topk_method"] = "group_limited_greedy" if int(out.get("n_group") or 1) > 1 else "greedy"
    if out["q_lora_rank"] and "blk.0.attn_q_a.weight" not in tensors:
        raise CheckpointError(f"GGUF {a}: attention.q_lora_rank is {out['q_lora_rank']} but tensor "
                              "'blk.0.attn_q_a.weight' is missing")
    if not out.get("n_routed_experts"):
        raise CheckpointError(f"GGUF {a}: expert_count is missing; Lagoon runs deepseek2 as a mixture of experts")
    return out


def _gpt_oss(field: Field, cfg: dict[str, Any]) -> dict[str, Any]:
    n = int(cfg["num_hidden_layers"])
    window = field("gpt-oss.attention.sliding_window", None)
    if window is None:
        raise CheckpointError("GGUF gpt-oss: attention.sliding_window is missing; the file is incomplete")
    # llama.cpp's set_swa_pattern(p): layer i slides when i % p < p - 1 (p = 2 for gpt-oss; 0 read as 2)
    sliding = _sliding_layers("gpt-oss", field, n, lambda i, p: i % (p or 2) < (p or 2) - 1, default_period=2)
    return {**cfg, "sliding_window": int(window), "attention_bias": True, "layer_types": _types(sliding)}


def _sliding_layers(arch: str, field: Field, n: int, rule: Callable[[int, int], bool], default_period: int) -> list[bool]:
    """Which of `n` layers slide: ``attention.sliding_window_pattern`` as a per-layer bool array,
    else ``attention.layer_types`` strings, else the period ``p`` (the pattern as a uint32, or
    `default_period`) through `rule(i, p)` (llama.cpp's set_swa_pattern for the architecture)."""
    pattern = field(f"{arch}.attention.sliding_window_pattern", None)
    if isinstance(pattern, list):
        if len(pattern) != n:
            raise CheckpointError(f"GGUF {arch}: sliding_window_pattern lists {len(pattern)} layers, block_count is {n}")
        return [bool(x) for x in pattern]
    types = field(f"{arch}.attention.layer_types", None)
    if isinstance(types, list) and pattern is None:
        if len(types) != n or not set(types) <= {"sliding_attention", "full_attention"}:
            raise CheckpointError(f"GGUF {arch}: attention.layer_types must name {n} layers, each "
                                  f"'sliding_attention' or 'full_attention'; the file has {types!r}")
        return [t == "sliding_attention" for t in types]
    p = default_period if pattern is None else int(pattern)
    return [rule(i, p) for i in range(n)]


def _types(sliding: list[bool]) -> list[str]:
    return ["sliding_attention" if s else "full_attention" for s in sliding]


def _laguna(field: Field, cfg: dict[str, Any], tensors: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    a, n, head_dim = "laguna", int(cfg["num_hidden_layers"]), int(cfg["head_dim"])
    heads = field(f"{a}.attention.head_count", None)
    heads = [int(h) for h in heads] if isinstance(heads, list) else [int(cfg["num_attention_heads"])] * n
    if len(heads) != n:
        raise CheckpointError(f"GGUF {a}: attention.head_count lists {len(heads)} layers, block_count is {n}")
    if not cfg.get("num_experts"):
        raise CheckpointError(f"GGUF {a}: expert_count is missing; Laguna is a mixture of experts")
    for key in ("leading_dense_block_count", "expert_shared_feed_forward_length"):
        if field(f"{a}.{key}", None) is None:
            raise CheckpointError(f"GGUF {a}: {key} is missing; llama.cpp's converter writes it for every Laguna")
    gating = int(field(f"{a}.expert_gating_func", 2) or 2)
    if gating != 2 or not field(f"{a}.expert_weights_norm", True):
        raise CheckpointError(f"GGUF {a}: Laguna routes by sigmoid (expert_gating_func 2) and renormalises the "
                              f"top k (expert_weights_norm true); the file says {gating} / "
                              f"{field(f'{a}.expert_weights_norm', None)}")
    window = int(field(f"{a}.attention.sliding_window", 0) or 0)
    # set_swa_pattern(p, dense_first): layer i is full iff i % p == 0 (p = 0: every layer slides)
    sliding = _sliding_layers(a, field, n, lambda i, p: p == 0 or i % p != 0, default_period=4) if window else [False] * n
    dense = int(field(f"{a}.leading_dense_block_count"))
    full = {"rope_type": "default", **rope_parameters(a, field), "rope_theta": float(cfg["rope_theta"]),
            "partial_rotary_factor": _rotary(a, int(field(f"{a}.rope.dimension_count", head_dim)), head_dim)}
    rot_swa = int(field(f"{a}.rope.dimension_count_swa", field(f"{a}.rope.dimension_count", head_dim)))
    swa = {"rope_type": "default", "rope_theta": float(field(f"{a}.rope.freq_base_swa", cfg["rope_theta"])),
           "partial_rotary_factor": _rotary(a, rot_swa, head_dim)}
    out = {k: v for k, v in cfg.items() if k not in ("partial_rotary_factor", "rope_parameters")}
    out.update(
        model_type="laguna", num_attention_heads=heads[0], num_attention_heads_per_layer=heads,
        layer_types=_types(sliding), sliding_window=window or None,
        mlp_layer_types=["dense" if i < dense else "sparse" for i in range(n)],
        rope_parameters={"full_attention": full, "sliding_attention": swa},
        gating=_laguna_gate(tensors, heads, head_dim),
        attention_bias="blk.0.attn_q.bias" in tensors,
        shared_expert_intermediate_size=int(field(f"{a}.expert_shared_feed_forward_length")),
        moe_routed_scaling_factor=float(field(f"{a}.expert_weights_scale", 1.0) or 1.0),
        moe_router_logit_softcapping=0.0,  # not in the file: llama.cpp runs Laguna's router without it
    )
    return out


def _rotary(arch: str, rot: int, head_dim: int) -> float:
    """``rope.dimension_count`` as the HF partial_rotary_factor whose ``int(head_dim · f)`` is `rot`
    exactly (rot / head_dim alone can round down by one)."""
    if rot <= 0 or rot > head_dim or rot % 2:
        raise CheckpointError(f"GGUF {arch}: a rope dimension count of {rot} does not fit heads of {head_dim} "
                              "(it must be even, 2..head_dim)")
    f = rot / head_dim
    return f if int(head_dim * f) == rot else math.nextafter(f, math.inf)


def _laguna_gate(tensors: Mapping[str, tuple[int, ...]], heads: list[int], head_dim: int) -> str:
    """Per-head or per-element softplus gating, from each layer's attn_gate rows (as llama.cpp decides)."""
    kinds = set()
    for i, h in enumerate(heads):
        name = f"blk.{i}.attn_gate.weight"
        shape = tensors.get(name)
        if shape is None:
            raise CheckpointError(f"GGUF tensor {name!r} is missing; every Laguna layer gates its attention output")
        if shape[0] not in (h, h * head_dim):
            raise CheckpointError(f"GGUF tensor {name!r} has shape {tuple(shape)}: its {shape[0]} rows are neither "
                                  f"{h} (a gate per head) nor {h * head_dim} (per element); the file is inconsistent")
        kinds.add("per-head" if shape[0] == h else "per-element")
    if len(kinds) > 1:
        raise CheckpointError("GGUF laguna: some layers gate per head and others per element; Lagoon runs one kind "
                              "per model (as transformers' LagunaConfig.gating does)")
    return kinds.pop() if kinds else "per-head"


def join_mla(args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """llama.cpp's split ``attn_k_b [H, R, N]`` / ``attn_v_b [H, V, R]`` → ``kv_b_proj [H·(N+V), R]``
    (per head: N key rows, then V value rows, as DeepSeek stores it)."""
    if not args.kv_lora_rank:
        return state
    out = {k: t for k, t in state.items() if not k.endswith(("gguf_k_b.weight", "gguf_v_b.weight"))}
    h, r, nope, v = args.n_heads, args.kv_lora_rank, args.qk_nope_head_dim, args.v_head_dim
    for layer in range(args.n_layers):
        key = f"layers.{layer}.self_attn.kv_b_proj.weight"
        k_b, v_b = (state.get(f"layers.{layer}.self_attn.gguf_{x}_b.weight") for x in ("k", "v"))
        if key in state or (k_b is None and v_b is None):
            continue  # the joined form (or neither: the missing kv_b_proj is named later)
        for name, t, shape in ((f"blk.{layer}.attn_k_b.weight", k_b, (h, r, nope)),
                               (f"blk.{layer}.attn_v_b.weight", v_b, (h, v, r))):
            if t is None:
                raise CheckpointError(f"GGUF tensor {name!r} is missing; MLA needs both attn_k_b and attn_v_b")
            if tuple(t.shape) != shape:
                raise CheckpointError(f"GGUF tensor {name!r} has shape {tuple(t.shape)}, the metadata implies {shape}")
        out[key] = torch.cat([k_b.transpose(1, 2), v_b], dim=1).reshape(h * (nope + v), r)
    return out


def gguf_name_of(name: str, arch: str) -> str:
    """The GGUF tensor a Lagoon tensor `name` is read from (for errors); `name` itself when none is."""
    from lagoon.engine.checkpoint import _GGUF_NAMES
    from lagoon.engine.gguf_moe import _NAMES

    top = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    parts = name.split(".")
    if parts[0] != "layers" or len(parts) < 4:
        return name
    layer, path, leaf = parts[1], ".".join(parts[2:-1]), parts[-1]
    if path == "self_attn" and leaf == "sinks":
        return f"blk.{layer}.attn_sinks.weight"
    if path == "mlp.router" and leaf == "e_score_correction_bias":
        return f"blk.{layer}.exp_probs_b.bias"
    tables = (ARCH_TENSORS, _GGUF_NAMES, _NAMES) if arch == "gpt-oss" else (_GGUF_NAMES, ARCH_TENSORS, _NAMES)
    for table in tables:
        kind = next((k for k, v in table.items() if v == path), None)
        if kind is not None:
            return f"blk.{layer}.{kind}.{leaf}"
    return name
