"""MoE GGUFs in llama.cpp's layout: architecture metadata → HF config keys, tensor names → Lagoon's.

    {arch}.expert_count / expert_used_count / expert_feed_forward_length     → experts, k, width
    {arch}.expert_shared_feed_forward_length (or × expert_shared_count)      → shared expert width
    {arch}.leading_dense_block_count, expert_group_count/_used_count,
    expert_weights_norm / _scale, expert_gating_func (1 softmax, 2 sigmoid)  → routing
    {arch}.nextn_predict_layers                                               → MTP blocks, skipped

    blk.N.ffn_gate_inp.weight [E, H]                    → layers.N.mlp.router.weight
    blk.N.exp_probs_b.bias [E]                          → layers.N.mlp.router.e_score_correction_bias
    blk.N.ffn_{gate,up}_exps.weight [E, I, H]           → layers.N.mlp.experts.gate_up_proj [E, 2I, H]
    blk.N.ffn_gate_up_exps.weight [E, 2I, H] (fused)    → layers.N.mlp.experts.gate_up_proj
    blk.N.ffn_down_exps.weight [E, H, I]                → layers.N.mlp.experts.down_proj
    blk.N.ffn_{gate,up}_exps.bias [E, I] (gpt-oss)      → layers.N.mlp.experts.gate_up_bias [E, 2I]
    blk.N.ffn_down_exps.bias [E, H] (gpt-oss)           → layers.N.mlp.experts.down_bias
    blk.N.ffn_gate_inp.bias [E] (gpt-oss)               → layers.N.mlp.router.bias
    blk.N.ffn_{gate,up,down}_shexp.weight               → layers.N.mlp.shared_expert.{gate,up,down}_proj.weight
    blk.N.ffn_gate_inp_shexp.weight [H] or [1, H]       → layers.N.mlp.shared_expert_gate.weight [1, H]

Architectures: ``qwen2moe``, ``qwen3moe`` (Qwen3-Coder-30B-A3B), ``olmoe``, ``glm4moe``,
``deepseek2`` (DeepSeek-V2/V3), ``gpt-oss``, ``laguna`` and ``llama`` with experts (Mixtral); the
attention side of deepseek2, gpt-oss and laguna (and laguna's shared expert and dense layers) lives
in `lagoon.engine.gguf_arch`. A missing or mis-shaped expert tensor raises `CheckpointError`
naming the GGUF tensor. This module is *not* the dense GGUF loader (`lagoon.engine.checkpoint`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from lagoon.errors import CheckpointError
from lagoon.model.args import ModelArgs

__all__ = ["MOE_ARCHS", "moe_config", "moe_tensor_name", "packed_expert_layers", "pack_experts", "stack_experts"]

MOE_ARCHS = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe", "glm4moe": "glm4_moe",
             "deepseek2": "deepseek_v3", "gpt-oss": "gpt_oss", "laguna": "laguna"}
_GROUPED = ("glm4_moe", "deepseek_v3")  # DeepSeek-style grouped router, shared experts, leading dense layers

_NAMES = {
    "ffn_gate_inp": "mlp.router", "exp_probs_b": "mlp.router",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_EXPS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down", "ffn_gate_up_exps": "gate_up"}
_KINDS = {v: k for k, v in _EXPS.items()}
_EXP_KEY = re.compile(r"^layers\.(\d+)\.mlp\.experts\.gguf_(gate_up|gate|up|down)(_bias)?$")
_PACKABLE = ("Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q5_K", "Q6_K")  # packed_experts


def moe_config(arch: str, field: Callable[[str, Any], Any]) -> dict[str, Any]:
    """HF config keys for an MoE `arch` (empty for a dense file)."""
    n_exp = field(f"{arch}.expert_count", None)
    if not n_exp:
        return {}
    family = MOE_ARCHS.get(arch, "mixtral")
    width = int(field(f"{arch}.expert_feed_forward_length", field(f"{arch}.feed_forward_length", 0)))
    shared = int(field(f"{arch}.expert_shared_feed_forward_length", 0) or 0)
    # llama.cpp: qwen3moe, mixtral, glm4moe, gpt-oss and laguna always renormalise the top k, qwen2moe
    # and olmoe never; deepseek2 only when the key says so (DeepSeek-V2-Lite does not)
    renorm = family in ("qwen3_moe", "mixtral", "glm4_moe", "gpt_oss", "laguna")
    cfg: dict[str, Any] = {
        "model_type": family,
        "num_experts": int(n_exp), "num_local_experts": int(n_exp), "n_routed_experts": int(n_exp),
        "num_experts_per_tok": int(field(f"{arch}.expert_used_count", 2)),
        "moe_intermediate_size": width,
        "norm_topk_prob": bool(field(f"{arch}.expert_weights_norm", renorm)),
    }
    if family in ("mixtral", "gpt_oss"):
        cfg["intermediate_size"] = width
    if family == "qwen2_moe":
        cfg["shared_expert_intermediate_size"] = shared
    if family in _GROUPED:
        cfg.update(_grouped(arch, field, width, shared, family))
    return cfg


def _grouped(arch: str, field: Callable[[str, Any], Any], width: int, shared: int, family: str) -> dict[str, Any]:
    """GLM-4.5 / DeepSeek-V2/V3: shared experts, leading dense layers, grouped router, its scoring."""
    n_shared = int(field(f"{arch}.expert_shared_count", 1) or 0)
    if shared and n_shared and shared != width * n_shared:
        raise CheckpointError(f"GGUF {arch}: expert_shared_feed_forward_length {shared} is not "
                              f"{n_shared} × expert_feed_forward_length {width}; the file is inconsistent")
    # 1 softmax, 2 sigmoid. DeepSeek-V2 GGUFs written before the key existed route by softmax (llama.cpp's rule)
    gating = int(field(f"{arch}.expert_gating_func", 2 if family == "glm4_moe" else 1) or 1)
    if gating not in (1, 2) or (family == "glm4_moe" and gating != 2):
        raise CheckpointError(f"GGUF {arch}: expert_gating_func {gating} is not supported for {family} "
                              "(1 = softmax, 2 = sigmoid; GLM-4.5 routes by sigmoid)")
    # groups under softmax are DeepSeek-V2 / V2.5's group-limited greedy (a group ranks by its best
    # expert), under sigmoid DeepSeek-V3's (its best two): the router picks the rule by the scoring
    n_group = int(field(f"{arch}.expert_group_count", 1) or 1)
    return dict(
        n_shared_experts=n_shared,
        first_k_dense_replace=int(field(f"{arch}.leading_dense_block_count", 0) or 0),
        n_group=n_group,
        topk_group=int(field(f"{arch}.expert_group_used_count", 1) or 1),
        routed_scaling_factor=float(field(f"{arch}.expert_weights_scale", 1.0) or 1.0),
        scoring_func="sigmoid" if gating == 2 else "softmax",
    )


def moe_tensor_name(parts: list[str]) -> str | None:
    """``blk.N.<kind>.<weight|bias>`` split on dots → Lagoon name (experts: a per-projection key
    that `stack_experts` stacks), or None for a name this module does not own."""
    layer, kind, leaf = parts[1], parts[2], parts[3]
    if kind in _EXPS:
        return f"layers.{layer}.mlp.experts.gguf_{_EXPS[kind]}{'_bias' if leaf == 'bias' else ''}"
    if kind == "exp_probs_b":
        return f"layers.{layer}.mlp.router.e_score_correction_bias"
    if kind in _NAMES:
        return f"layers.{layer}.{_NAMES[kind]}.{leaf}"
    return None


def stack_experts(args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-projection expert tensors → stacked ``gate_up_proj`` / ``down_proj`` (and gpt-oss's
    ``gate_up_bias`` / ``down_bias``), each checked against the metadata."""
    out: dict[str, torch.Tensor] = {}
    found: dict[tuple[int, str], torch.Tensor] = {}
    for name, t in state.items():
        m = _EXP_KEY.match(name)
        if m:
            found[(int(m.group(1)), m.group(2) + (m.group(3) or ""))] = t
        elif name.endswith("mlp.shared_expert_gate.weight") and t.dim() == 1:
            out[name] = t.reshape(1, -1)  # llama.cpp stores the shared-expert gate as [H]
        else:
            out[name] = t
    e, i, h = args.num_experts, args.moe_intermediate_size, args.dim
    want = {"gate": (e, i, h), "up": (e, i, h), "down": (e, h, i), "gate_up": (e, 2 * i, h),
            "gate_bias": (e, i), "up_bias": (e, i), "down_bias": (e, h), "gate_up_bias": (e, 2 * i)}

    def take(layer: int, proj: str) -> torch.Tensor:
        t = found.pop((layer, proj), None)
        kind, leaf = _KINDS[proj.removesuffix("_bias")], "bias" if proj.endswith("_bias") else "weight"
        gguf_name = f"blk.{layer}.{kind}.{leaf}"
        if t is None:
            raise CheckpointError(f"GGUF tensor {gguf_name!r} is missing; the file does not match its metadata")
        if tuple(t.shape) != want[proj]:
            raise CheckpointError(f"GGUF tensor {gguf_name!r} has shape {tuple(t.shape)}, the metadata implies "
                                  f"{want[proj]} (experts, out{', in' if leaf == 'weight' else ''}); the file is inconsistent")
        return t

    def gate_up(layer: int, suffix: str) -> torch.Tensor:
        if (layer, "gate_up" + suffix) in found:  # llama.cpp's fused form: gate rows, then up rows
            return take(layer, "gate_up" + suffix)
        return torch.cat([take(layer, "gate" + suffix), take(layer, "up" + suffix)], 1)

    for layer in range(args.n_layers):
        if not args.is_moe_layer(layer):
            continue
        prefix = f"layers.{layer}.mlp.experts"
        out[f"{prefix}.gate_up_proj"] = gate_up(layer, "")
        out[f"{prefix}.down_proj"] = take(layer, "down")
        if args.expert_bias:
            out[f"{prefix}.gate_up_bias"] = gate_up(layer, "_bias")
            out[f"{prefix}.down_bias"] = take(layer, "down_bias")
    if found:  # an expert tensor the metadata leaves no place for (a bias on bias-free experts, a dense layer)
        (layer, proj), _ = next(iter(found.items()))
        leaf = "bias" if proj.endswith("_bias") else "weight"
        raise CheckpointError(f"GGUF tensor 'blk.{layer}.{_KINDS[proj.removesuffix('_bias')]}.{leaf}' has no place in "
                              f"this {args.family} model (layer {layer} is {args.layers[layer].mlp}); the file does "
                              "not match its metadata")
    return out


def packed_expert_layers(tensors: list[Any]) -> set[int]:
    """The MoE layers whose every expert weight is a type `lagoon.engine.packed_experts` keeps packed
    (4-bit as it is, the others of `_PACKABLE` as int8 blocks); `tensors` are a GGUF reader's. A layer
    with a float or MXFP4 expert tensor stays float (dequantized) as before."""
    kinds: dict[int, list[str]] = {}
    for t in tensors:
        parts = t.name.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[2] in _EXPS and parts[3] == "weight":
            kinds.setdefault(int(parts[1]), []).append(t.tensor_type.name)
    return {layer for layer, ks in kinds.items() if all(k in _PACKABLE for k in ks)}


def pack_experts(model: torch.nn.Module, raw: dict[str, tuple[str, Any, list[int]]],
                 q4_fields: dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]],
                 isa: str) -> int:
    """Swap the experts of every layer in `raw` (Lagoon name ``layers.N.mlp.experts.gguf_<proj>`` ->
    (GGML type, raw blocks, shape), as `packed_expert_layers` chose them) for `PackedExperts`."""
    from lagoon.engine.packed_experts import pack_gguf_experts, swap_packed_experts

    by_layer: dict[int, dict[str, tuple[str, Any, tuple[int, int, int]]]] = {}
    for name, (kind, data, shape) in raw.items():
        m = _EXP_KEY.match(name)
        assert m is not None and not m.group(3), name  # only expert weights are collected
        by_layer.setdefault(int(m.group(1)), {})[m.group(2)] = (kind, data, (shape[0], shape[1], shape[2]))
    packed = {}
    for layer, projs in sorted(by_layer.items()):
        gate_up = [projs["gate_up"]] if "gate_up" in projs else [projs["gate"], projs["up"]]
        packed[layer] = {"gate_up": pack_gguf_experts(gate_up, q4_fields), "down": pack_gguf_experts([projs["down"]], q4_fields)}
    return swap_packed_experts(model, packed, isa)
