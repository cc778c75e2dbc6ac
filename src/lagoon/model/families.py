"""Per-family reading of a HF ``config.json`` into `ModelArgs` keyword arguments.

One function per family adds what that family means on top of the shared fields (sizes, norms,
RoPE, token ids): which layers are MoE, how the router scores, per-layer attention kinds. A family
missing from `PARSERS` raises `UnsupportedModelError` naming the known ones. This module is *not*
weight-name mapping (`lagoon.engine.moe_names`) nor the model (`lagoon.model.transformer`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lagoon.errors import UnsupportedModelError
from lagoon.model.args import FAMILIES, LayerSpec
from lagoon.model.rope import rope_spec

__all__ = ["family_fields", "PARSERS"]


def _common(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    dim = int(cfg["hidden_size"])
    n_heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or dim // n_heads)
    max_pos = int(cfg.get("max_position_embeddings", 4096))
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    if "partial_rotary_factor" not in rope and cfg.get("partial_rotary_factor") is not None:
        rope["partial_rotary_factor"] = cfg["partial_rotary_factor"]
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    out: dict[str, Any] = {
        "family": family,
        "vocab_size": int(cfg["vocab_size"]),
        "dim": dim,
        "n_layers": int(cfg["num_hidden_layers"]),
        "n_heads": n_heads,
        "n_kv_heads": int(cfg.get("num_key_value_heads") or n_heads),
        "head_dim": head_dim,
        "intermediate_size": int(cfg["intermediate_size"]),
        "norm_eps": float(cfg.get("rms_norm_eps", 1e-6)),
        "max_position_embeddings": max_pos,
        "clip_qkv": cfg.get("clip_qkv"),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_ids": eos_ids,
        "hidden_act": str(cfg.get("hidden_act", "silu")),
    }
    if "sliding_attention" not in rope and "full_attention" not in rope:  # one table for every layer
        spec = rope_spec(rope, head_dim, max_pos, float(cfg.get("rope_theta", 10000.0)))
        out["ropes"] = (("default", spec),)
        out["rope_theta"] = spec.theta
        out["rope_scaling"] = spec.scaling
    return out


def _layers(a: dict[str, Any], sparse: Callable[[int], bool], **per: Any) -> tuple[LayerSpec, ...]:
    return tuple(
        LayerSpec(n_heads=a["n_heads"], n_kv_heads=a["n_kv_heads"], head_dim=a["head_dim"],
                  mlp="moe" if sparse(i) else "dense", **per)
        for i in range(a["n_layers"])
    )


def _dense(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    a = _common(family, cfg)
    a.update(qkv_bias=True if family == "qwen2" else bool(cfg.get("attention_bias", False)),
             o_bias=family != "qwen2" and bool(cfg.get("attention_bias", False)),
             qk_norm=family == "qwen3")
    return a


def _classic_moe(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE: softmax router, MoE every `decoder_sparse_step` layers."""
    a = _common(family, cfg)
    shared = int(cfg.get("shared_expert_intermediate_size", 0) or 0)
    a.update(
        qkv_bias=bool(cfg.get("qkv_bias", True)) if family == "qwen2_moe" else bool(cfg.get("attention_bias", False)),
        o_bias=family in ("qwen3_moe", "olmoe") and bool(cfg.get("attention_bias", False)),
        qk_norm=family in ("qwen3_moe", "olmoe"),
        qk_norm_full=family == "olmoe",
        num_experts=int(cfg.get("num_local_experts", cfg.get("num_experts"))),
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", cfg["intermediate_size"])),
        norm_topk_prob=bool(cfg.get("norm_topk_prob", family == "mixtral")),
        shared_intermediate_size=shared,
        shared_expert_gate=bool(shared),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1) or 1),
        mlp_only_layers=tuple(cfg.get("mlp_only_layers", ()) or ()),
        expert_weighting=str(cfg.get("lagoon_expert_weighting", "scores")),  # `lagoon moefy` writes "unit"
    )
    step, dense = max(a["decoder_sparse_step"], 1), set(a["mlp_only_layers"])
    a["layers"] = _layers(a, lambda i: i not in dense and (i + 1) % step == 0)
    return a


def _grouped_sigmoid_moe(cfg: dict[str, Any], num_experts: int) -> dict[str, Any]:
    """The DeepSeek-style MoE keys GLM-4.5 and DeepSeek-V3 share: grouped sigmoid router (softmax
    when `scoring_func` says so), shared experts as `n_shared_experts` x the expert width, routed scaling."""
    moe_i = int(cfg["moe_intermediate_size"])
    return dict(
        num_experts=num_experts,
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=moe_i,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        shared_intermediate_size=moe_i * int(cfg.get("n_shared_experts", 1) or 0),
        scoring=str(cfg.get("scoring_func") or "sigmoid"),  # DeepSeek-V2(-Lite) GGUFs: softmax
        n_group=int(cfg.get("n_group", 1) or 1),
        topk_group=int(cfg.get("topk_group", 1) or 1),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
    )


def _glm4_moe(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """GLM-4.5/4.6: partial rotary, DeepSeek-style grouped sigmoid router, shared experts, the first
    `first_k_dense_replace` layers dense. Its multi-token-prediction layers (indices >= n_layers)
    are skipped by the loader."""
    if "partial_rotary_factor" not in (cfg.get("rope_parameters") or {}):
        cfg = {**cfg, "partial_rotary_factor": cfg.get("partial_rotary_factor", 0.5)}
    a = _common(family, cfg)
    a.update(
        _grouped_sigmoid_moe(cfg, int(cfg.get("n_routed_experts", cfg.get("num_local_experts", 0)))),
        qkv_bias=bool(cfg.get("attention_bias", False)),
        qk_norm=bool(cfg.get("use_qk_norm", False)),
    )
    first_dense = int(cfg.get("first_k_dense_replace", 0) or 0)
    a["layers"] = _layers(a, lambda i: i >= first_dense)
    return a


def _laguna(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """Laguna: per-layer attention type (sliding window / full) with its own RoPE table, per-layer
    query heads, q/k RMSNorm, softplus output gate, sigmoid router with correction bias and optional
    logit softcap, shared expert, routed scaling, dense layers named by `mlp_layer_types`."""
    a = _common(family, cfg)
    n = a["n_layers"]
    types = list(cfg.get("layer_types") or ["full_attention"] * n)
    mlp_types = list(cfg.get("mlp_layer_types") or ["dense"] + ["sparse"] * (n - 1))
    heads = list(cfg.get("num_attention_heads_per_layer") or [a["n_heads"]] * n)
    if not len(types) == len(mlp_types) == len(heads) == n:
        raise ValueError(f"layer_types / mlp_layer_types / num_attention_heads_per_layer must list {n} layers")
    tables = cfg.get("rope_parameters") or {
        "full_attention": {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 0.5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.0},
    }
    a["ropes"] = tuple((t, rope_spec(tables[t], a["head_dim"], a["max_position_embeddings"])) for t in sorted(set(types)))
    gating = cfg.get("gating", True)
    window = int(cfg.get("sliding_window") or 0) or None
    a["layers"] = tuple(
        LayerSpec(n_heads=int(heads[i]), n_kv_heads=a["n_kv_heads"], head_dim=a["head_dim"],
                  window=window if types[i] == "sliding_attention" else None, rope=types[i],
                  output_gate="head" if gating is True or gating == "per-head" else "element",
                  mlp="moe" if mlp_types[i] == "sparse" else "dense")
        for i in range(n)
    )
    bias = bool(cfg.get("attention_bias", False))
    a.update(
        qkv_bias=bias, o_bias=bias, qk_norm=True,
        num_experts=int(cfg["num_experts"]),
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["moe_intermediate_size"]),
        norm_topk_prob=True,
        shared_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 0) or 0),
        scoring="sigmoid",
        routed_scaling_factor=float(cfg.get("moe_routed_scaling_factor", 1.0)),
        router_softcap=float(cfg.get("moe_router_logit_softcapping", 0.0) or 0.0),
    )
    return a


def _gpt_oss(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """gpt-oss: alternating sliding/full attention with per-head sinks, biases everywhere, a softmax
    router with bias (softmax over the top k = softmax then renormalise), clamped-SwiGLU experts with
    biases, every layer MoE."""
    a = _common(family, cfg)
    n = a["n_layers"]
    types = list(cfg.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)])
    if len(types) != n:
        raise ValueError(f"layer_types must list {n} layers")
    window = int(cfg.get("sliding_window") or 0) or None
    a["layers"] = tuple(
        LayerSpec(n_heads=a["n_heads"], n_kv_heads=a["n_kv_heads"], head_dim=a["head_dim"],
                  window=window if types[i] == "sliding_attention" else None, sinks=True, mlp="moe")
        for i in range(n)
    )
    bias = bool(cfg.get("attention_bias", True))
    a.update(
        qkv_bias=bias, o_bias=bias,
        num_experts=int(cfg["num_local_experts"]),
        top_k=int(cfg["num_experts_per_tok"]),
        moe_intermediate_size=int(cfg["intermediate_size"]),
        norm_topk_prob=True,
        router_bias=True,
        expert_glu="clamped", expert_bias=True,
        glu_alpha=float(cfg.get("swiglu_alpha", 1.702)), glu_limit=float(cfg.get("swiglu_limit", 7.0)),
    )
    return a


_TOPK_METHODS = {"deepseek_v2": ("greedy", "group_limited_greedy"), "deepseek_v3": ("noaux_tc",)}


def _deepseek_v3(family: str, cfg: dict[str, Any]) -> dict[str, Any]:
    """DeepSeek-V3: multi-head latent attention (the cache holds the kv latent + the shared roped
    key), grouped sigmoid router with correction bias, shared experts, the first
    `first_k_dense_replace` layers dense; MTP layers past n_layers are skipped by the loader.
    DeepSeek-V2 / V2.5 (`deepseek_v2`) is the same network with a softmax router: ``greedy`` (V2-Lite)
    ignores the groups, ``group_limited_greedy`` (V2, V2.5) keeps the `topk_group` groups holding the
    best experts; its mixing weights are the softmax probabilities (renormalised only under
    `norm_topk_prob`, which the released V2 checkpoints leave off) x `routed_scaling_factor`. (Under
    `norm_topk_prob` DeepSeek's own V2 code skips the scaling, vLLM and llama.cpp apply both, as
    Lagoon does; transformers never renormalises. No released V2 checkpoint sets it.)"""
    method = cfg.get("topk_method") or _TOPK_METHODS[family][0]
    if method not in _TOPK_METHODS[family]:
        raise UnsupportedModelError(f"{family} topk_method {method!r} is not supported; Lagoon runs "
                                    f"{', '.join(_TOPK_METHODS[family])} for {family}")
    if family == "deepseek_v2":
        grouped = method == "group_limited_greedy"
        cfg = {**cfg, "scoring_func": cfg.get("scoring_func") or "softmax", "norm_topk_prob": bool(cfg.get("norm_topk_prob")),
               "n_group": cfg.get("n_group") if grouped else 1, "topk_group": cfg.get("topk_group") if grouped else 1}
    rope_dim = int(cfg["qk_rope_head_dim"])
    a = _common(family, {**cfg, "head_dim": rope_dim})  # the RoPE table rotates qk_rope_head_dim channels
    a.update(
        _grouped_sigmoid_moe(cfg, int(cfg["n_routed_experts"])),
        qkv_bias=bool(cfg.get("attention_bias", False)), o_bias=bool(cfg.get("attention_bias", False)),
        q_lora_rank=int(cfg.get("q_lora_rank") or 0),
        kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
        qk_rope_head_dim=rope_dim,
        v_head_dim=int(cfg["v_head_dim"]),
        rope_interleave=bool(cfg.get("rope_interleave", True)),
    )
    first_dense = int(cfg.get("first_k_dense_replace", 0) or 0)
    a["layers"] = tuple(
        LayerSpec(attention="mla", n_heads=a["n_heads"], n_kv_heads=a["n_heads"], head_dim=rope_dim,
                  mlp="moe" if i >= first_dense else "dense")
        for i in range(a["n_layers"])
    )
    return a


PARSERS: dict[str, Callable[[str, dict[str, Any]], dict[str, Any]]] = {
    "llama": _dense, "qwen2": _dense, "qwen3": _dense,
    "mixtral": _classic_moe, "qwen2_moe": _classic_moe, "qwen3_moe": _classic_moe, "olmoe": _classic_moe,
    "glm4_moe": _glm4_moe, "laguna": _laguna, "gpt_oss": _gpt_oss,
    "deepseek_v2": _deepseek_v3, "deepseek_v3": _deepseek_v3,
}


def family_fields(family: Any, cfg: dict[str, Any]) -> dict[str, Any]:
    """`ModelArgs` keyword arguments for `cfg` (a HF config dict of `model_type` `family`)."""
    parse = PARSERS.get(family) if isinstance(family, str) else None
    if parse is None:
        raise UnsupportedModelError(f"model_type {family!r} is not supported; Lagoon runs: {', '.join(FAMILIES)}")
    return parse(family, cfg)
