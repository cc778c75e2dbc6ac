"""`ModelArgs`: the frozen shape of a decoder-only transformer, read from a HF `config.json`.

Whole-model fields (vocab, width, norms, the MoE router's rule) live on `ModelArgs`; everything that
may differ from one layer to the next lives in one `LayerSpec` per layer (attention kind, heads,
sliding window, which RoPE table, output gate, attention sinks, dense or MoE MLP), so the model code
reads a spec instead of branching on the family. RoPE tables (`lagoon.model.rope.RopeSpec`) are
named: most families have one (``default``), Laguna one per layer type.

Per-family knowledge (which config keys mean what) lives in `lagoon.model.families`; a `model_type`
it does not know raises `UnsupportedModelError` naming the known families. This module is *not* a
config loader for Lagoon itself (see `lagoon.config`); it only describes the network a checkpoint holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from lagoon.errors import CheckpointError
from lagoon.model.rope import RopeSpec, rope_spec

__all__ = ["ModelArgs", "LayerSpec", "FAMILIES", "MOE_FAMILIES", "ATTENTION_KINDS"]

DENSE_FAMILIES = ("llama", "qwen2", "qwen3")
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "laguna", "gpt_oss", "deepseek_v2",
                "deepseek_v3")
FAMILIES = DENSE_FAMILIES + MOE_FAMILIES
ATTENTION_KINDS = ("gqa", "mla")  # grouped-query; multi-head latent (DeepSeek-V3, `lagoon.model.mla`)


@dataclass(frozen=True)
class LayerSpec:
    """What one decoder layer is. `window`: sliding-window length (None = full attention);
    `output_gate`: Laguna's softplus gate on the attention output, per ``head`` or per ``element``;
    `sinks`: gpt-oss's learned per-head sink logit that joins every softmax (and takes some of its mass)."""

    attention: str = "gqa"
    n_heads: int = 0
    n_kv_heads: int = 0
    head_dim: int = 0
    window: int | None = None
    rope: str = "default"
    output_gate: Literal["head", "element"] | None = None
    sinks: bool = False
    mlp: Literal["dense", "moe"] = "dense"


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
    hidden_act: str = "silu"
    # MoE (num_experts == 0 means dense)
    num_experts: int = 0
    top_k: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_intermediate_size: int = 0
    shared_expert_gate: bool = False  # Qwen2-MoE gates its shared expert with a sigmoid
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    expert_weighting: str = "scores"  # "unit": chosen experts summed with weight 1 (`lagoon moefy` models)
    scoring: Literal["softmax", "sigmoid"] = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    router_softcap: float = 0.0
    router_bias: bool = False  # gpt-oss: the router's linear has a bias
    expert_glu: str = "gated"  # lagoon.moe.GLU kind: "gated" act(gate)·up, "clamped" gpt-oss
    expert_bias: bool = False  # gpt-oss: gate_up / down biases per expert
    glu_alpha: float = 1.702
    glu_limit: float = 7.0
    # multi-head latent attention (DeepSeek-V3); q_lora_rank 0 = a plain q_proj
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rotated channels stored as (x0, x1) pairs, not halves
    # per layer (filled from the fields above when empty) and the named RoPE tables
    layers: tuple[LayerSpec, ...] = ()
    ropes: tuple[tuple[str, RopeSpec], ...] = ()
    extra: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self) -> None:
        if not self.ropes:
            params = {**dict(self.rope_scaling), "rope_theta": self.rope_theta}
            spec = rope_spec(params, self.head_dim, self.max_position_embeddings)
            object.__setattr__(self, "ropes", (("default", spec),))
        if not self.layers:
            object.__setattr__(self, "layers", tuple(
                LayerSpec(n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim,
                          mlp="moe" if self._sparse_by_step(i) else "dense")
                for i in range(self.n_layers)
            ))

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def _sparse_by_step(self, layer: int) -> bool:
        if not self.is_moe or layer in self.mlp_only_layers:
            return False
        return (layer + 1) % max(self.decoder_sparse_step, 1) == 0

    def is_moe_layer(self, layer: int) -> bool:
        return self.layers[layer].mlp == "moe"

    @property
    def kv_cache_dims(self) -> tuple[int, int, int]:
        """(heads, key width, value width) one cached token holds per layer. MLA caches its
        compressed latent and the shared roped key, not per-head K/V."""
        if self.kv_lora_rank:
            return 1, self.kv_lora_rank, self.qk_rope_head_dim
        return self.n_kv_heads, self.head_dim, self.head_dim

    def rope_table(self, name: str) -> RopeSpec:
        return dict(self.ropes)[name]

    @property
    def rope(self) -> dict[str, Any]:
        return dict(self.rope_scaling)

    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any]) -> ModelArgs:
        from lagoon.model.families import family_fields

        family = cfg.get("model_type")
        try:
            return cls(**family_fields(family, cfg))
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
        args = cls.from_hf_config(cfg)
        extra = _generation_eos(Path(folder) / "generation_config.json")
        return replace(args, eos_token_ids=tuple(dict.fromkeys(args.eos_token_ids + extra))) if extra else args


def _generation_eos(path: Path) -> tuple[int, ...]:
    """The stop ids of `generation_config.json` (as transformers' `generate` and vLLM use them): chat
    models often list their end-of-turn token there only (e.g. `<|eot_id|>` beside
    `<|end_of_text|>`). A missing or unreadable file adds nothing: it is optional."""
    try:
        eos = json.loads(path.read_text()).get("eos_token_id")
    except (OSError, ValueError, AttributeError):
        return ()
    ids = eos if isinstance(eos, list) else [eos]
    return tuple(int(t) for t in ids if isinstance(t, int) and not isinstance(t, bool))
