"""MoE GGUFs in llama.cpp's layout: architecture metadata → HF config keys, tensor names → Lagoon's.

    {arch}.expert_count / expert_used_count / expert_feed_forward_length     → experts, k, width
    {arch}.expert_shared_feed_forward_length (or × expert_shared_count)      → shared expert width
    {arch}.leading_dense_block_count, expert_group_count/_used_count,
    expert_weights_norm / _scale, expert_gating_func (1 softmax, 2 sigmoid)  → routing
    {arch}.nextn_predict_layers                                               → MTP blocks, skipped

    blk.N.ffn_gate_inp.weight [E, H]                    → layers.N.mlp.router.weight
    blk.N.exp_probs_b.bias [E]                          → layers.N.mlp.router.e_score_correction_bias
    blk.N.ffn_{gate,up}_exps.weight [E, I, H]           → layers.N.mlp.experts.gate_up_proj [E, 2I, H]
    blk.N.ffn_down_exps.weight [E, H, I]                → layers.N.mlp.experts.down_proj
    blk.N.ffn_{gate,up,down}_shexp.weight               → layers.N.mlp.shared_expert.{gate,up,down}_proj.weight
    blk.N.ffn_gate_inp_shexp.weight [H] or [1, H]       → layers.N.mlp.shared_expert_gate.weight [1, H]

Architectures: ``qwen2moe``, ``qwen3moe`` (Qwen3-Coder-30B-A3B), ``olmoe``, ``glm4moe`` and
``llama`` with experts (Mixtral). A missing or mis-shaped expert tensor raises `CheckpointError`
naming the GGUF tensor. This module is *not* the dense GGUF loader (`lagoon.engine.checkpoint`).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import torch

from lagoon.errors import CheckpointError
from lagoon.model.args import ModelArgs

__all__ = ["MOE_ARCHS", "moe_config", "moe_tensor_name", "stack_experts"]

MOE_ARCHS = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe", "olmoe": "olmoe", "glm4moe": "glm4_moe"}

_NAMES = {
    "ffn_gate_inp": "mlp.router", "exp_probs_b": "mlp.router",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}
_EXPS = {"ffn_gate_exps": "gate", "ffn_up_exps": "up", "ffn_down_exps": "down"}
_EXP_KEY = re.compile(r"^layers\.(\d+)\.mlp\.experts\.gguf_(gate|up|down)$")


def moe_config(arch: str, field: Callable[[str, Any], Any]) -> dict[str, Any]:
    """HF config keys for an MoE `arch` (empty for a dense file)."""
    n_exp = field(f"{arch}.expert_count", None)
    if not n_exp:
        return {}
    family = MOE_ARCHS.get(arch, "mixtral")
    width = int(field(f"{arch}.expert_feed_forward_length", field(f"{arch}.feed_forward_length", 0)))
    shared = int(field(f"{arch}.expert_shared_feed_forward_length", 0) or 0)
    cfg: dict[str, Any] = {
        "model_type": family,
        "num_experts": int(n_exp), "num_local_experts": int(n_exp), "n_routed_experts": int(n_exp),
        "num_experts_per_tok": int(field(f"{arch}.expert_used_count", 2)),
        "moe_intermediate_size": width,
        # llama.cpp: qwen3moe and mixtral always renormalise the top k, qwen2moe and olmoe never
        "norm_topk_prob": bool(field(f"{arch}.expert_weights_norm", family in ("qwen3_moe", "mixtral", "glm4_moe"))),
    }
    if family == "mixtral":
        cfg["intermediate_size"] = width
    if family == "qwen2_moe":
        cfg["shared_expert_intermediate_size"] = shared
    if family == "glm4_moe":
        n_shared = int(field(f"{arch}.expert_shared_count", 1) or 0)
        cfg.update(
            n_shared_experts=n_shared,
            first_k_dense_replace=int(field(f"{arch}.leading_dense_block_count", 0) or 0),
            n_group=int(field(f"{arch}.expert_group_count", 1) or 1),
            topk_group=int(field(f"{arch}.expert_group_used_count", 1) or 1),
            routed_scaling_factor=float(field(f"{arch}.expert_weights_scale", 1.0) or 1.0),
        )
        if shared and n_shared and shared != width * n_shared:
            raise CheckpointError(f"GGUF {arch}: expert_shared_feed_forward_length {shared} is not "
                                  f"{n_shared} × expert_feed_forward_length {width}; the file is inconsistent")
        gating = int(field(f"{arch}.expert_gating_func", 2) or 2)
        if gating != 2:
            raise CheckpointError(f"GGUF {arch}: expert_gating_func {gating} (1 = softmax) but GLM-4.5 routes by sigmoid")
    return cfg


def moe_tensor_name(parts: list[str]) -> str | None:
    """``blk.N.<kind>.<weight|bias>`` split on dots → Lagoon name (experts: a per-projection key
    that `stack_experts` stacks), or None for a name this module does not own."""
    layer, kind, leaf = parts[1], parts[2], parts[3]
    if kind in _EXPS:
        return f"layers.{layer}.mlp.experts.gguf_{_EXPS[kind]}"
    if kind == "exp_probs_b":
        return f"layers.{layer}.mlp.router.e_score_correction_bias"
    if kind in _NAMES:
        return f"layers.{layer}.{_NAMES[kind]}.{leaf}"
    return None


def stack_experts(args: ModelArgs, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-projection expert tensors → stacked ``gate_up_proj`` / ``down_proj``, each checked."""
    out: dict[str, torch.Tensor] = {}
    found: dict[tuple[int, str], torch.Tensor] = {}
    for name, t in state.items():
        m = _EXP_KEY.match(name)
        if m:
            found[(int(m.group(1)), m.group(2))] = t
        elif name.endswith("mlp.shared_expert_gate.weight") and t.dim() == 1:
            out[name] = t.reshape(1, -1)  # llama.cpp stores the shared-expert gate as [H]
        else:
            out[name] = t
    e, i, h = args.num_experts, args.moe_intermediate_size, args.dim
    want = {"gate": (e, i, h), "up": (e, i, h), "down": (e, h, i)}
    kinds = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}
    for layer in range(args.n_layers):
        if not args.is_moe_layer(layer):
            continue
        for proj, shape in want.items():
            t = found.get((layer, proj))
            gguf_name = f"blk.{layer}.{kinds[proj]}.weight"
            if t is None:
                raise CheckpointError(f"GGUF tensor {gguf_name!r} is missing; the file does not match its metadata")
            if tuple(t.shape) != shape:
                raise CheckpointError(f"GGUF tensor {gguf_name!r} has shape {tuple(t.shape)}, the metadata implies "
                                      f"{shape} (experts, out, in); the file is inconsistent")
        out[f"layers.{layer}.mlp.experts.gate_up_proj"] = torch.cat([found[(layer, "gate")], found[(layer, "up")]], 1)
        out[f"layers.{layer}.mlp.experts.down_proj"] = found[(layer, "down")]
    return out
