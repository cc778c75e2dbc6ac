"""`ModelArgs`: the frozen shape of a decoder-only transformer, read from a HF `config.json`.

Covers the dense families `llama`, `qwen2`, `qwen3` and the MoE families `mixtral`, `qwen2_moe`,
`qwen3_moe`, `olmoe`. Anything else raises `UnsupportedModelError` naming the known families.
RoPE scaling is read from `rope_parameters` (transformers 5) or `rope_scaling` (older files).

This module is *not* a config loader for Lagoon itself (see `lagoon.config`); it only describes
the network a checkpoint holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lagoon.errors import CheckpointError, UnsupportedModelError

__all__ = ["ModelArgs", "FAMILIES", "MOE_FAMILIES"]

DENSE_FAMILIES = ("llama", "qwen2", "qwen3")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe")
FAMILIES = DENSE_FAMILIES + MOE_FAMILIES


@dataclass(frozen=True)
class ModelArgs:
    family: str
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] = ()
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    clip_qkv: float | None = None
    qk_norm: bool = False
    qk_norm_full: bool = False  # OLMoE normalises the whole q/k projection, not per head
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_moe_layer(self, layer: int) -> bool:
        if not self.is_moe or layer in self.mlp_only_layers:
            return False
        return (layer + 1) % max(self.decoder_sparse_step, 1) == 0

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise UnsupportedModelError(
                f"model_type {family!r} is not supported; Lagoon runs: {', '.join(FAMILIES)}"
            )
        try:
            dim = int(cfg["hidden_size"])
            n_heads = int(cfg["num_attention_heads"])
            rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
            theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
            rope_type = rope.get("rope_type", rope.get("type", "default"))
            rope["rope_type"] = rope_type
            rope.pop("type", None)
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            moe: dict[str, Any] = {}
            if family in MOE_FAMILIES:
                n_exp = cfg.get("num_local_experts", cfg.get("num_experts"))
                moe = {
                    "num_experts": int(n_exp),
                    "top_k": int(cfg["num_experts_per_tok"]),
                    "moe_intermediate_size": int(cfg.get("moe_intermediate_size", cfg["intermediate_size"])),
                    "norm_topk_prob": bool(cfg.get("norm_topk_prob", family == "mixtral")),
                    "shared_intermediate_size": int(cfg.get("shared_expert_intermediate_size", 0) or 0),
                    "decoder_sparse_step": int(cfg.get("decoder_sparse_step", 1) or 1),
                    "mlp_only_layers": tuple(cfg.get("mlp_only_layers", ()) or ()),
                }
            return cls(
                family=family,
                vocab_size=int(cfg["vocab_size"]),
                dim=dim,
                n_layers=int(cfg["num_hidden_layers"]),
                n_heads=n_heads,
                n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
                head_dim=int(cfg.get("head_dim") or dim // n_heads),
                intermediate_size=int(cfg["intermediate_size"]),
                norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=theta,
                rope_scaling=tuple(sorted(rope.items())),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
                qkv_bias=_qkv_bias(family, cfg),
                o_bias=family in ("llama", "qwen3", "qwen3_moe", "olmoe") and bool(cfg.get("attention_bias", False)),
                clip_qkv=cfg.get("clip_qkv"),
                qk_norm=family in ("qwen3", "qwen3_moe", "olmoe"),
                qk_norm_full=family == "olmoe",
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                **moe,
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(
                f"config.json for {family!r} lacks or mistypes a field ({exc!r}); re-export it with transformers"
            ) from exc

    @classmethod
    def from_folder(cls, folder: str | Path) -> ModelArgs:
        path = Path(folder) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: a HF checkpoint folder needs config.json")
        try:
            cfg = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc}); re-export the checkpoint") from exc
        if not isinstance(cfg, dict):
            raise CheckpointError(f"{path} is a JSON {type(cfg).__name__}, not an object; re-export the checkpoint")
        return cls.from_hf_config(cfg)


def _qkv_bias(family: str, cfg: dict[str, Any]) -> bool:
    if family == "qwen2":
        return True
    if family == "qwen2_moe":
        return bool(cfg.get("qkv_bias", True))
    return bool(cfg.get("attention_bias", False))
