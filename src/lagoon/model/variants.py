"""`VARIANTS`: the models ``model_deployment.variant`` can name, with the shape their publishers
state (family, total / active parameters, routed experts, experts per token, layers), and
`check_variant`, which holds a loaded model against the named one.

A name not in the table stays free-form (a label for reports and telemetry, nothing checked). Numbers
are the publishers' model-card figures; a field left None is not checked (Laguna M.1's sizes are not
public in any source Lagoon ships). Not here: the parameter count itself (`lagoon.moe.footprint`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Variant", "VARIANTS", "check_variant", "preset"]


@dataclass(frozen=True)
class Variant:
    name: str
    family: str
    total: float | None = None
    active: float | None = None
    num_experts: int | None = None
    top_k: int | None = None
    layers: int | None = None
    note: str = ""


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    # transformers' LagunaConfig defaults are XS.2's shape: 40 layers, 256 experts, 8 per token
    Variant("laguna_xs2", "laguna", 33.4e9, 3e9, 256, 8, 40, "poolside Laguna XS.2"),
    Variant("laguna_m1", "laguna", note="poolside Laguna M.1 (sizes not checked)"),
    Variant("qwen3_coder_30b_a3b", "qwen3_moe", 30.5e9, 3.3e9, 128, 8, 48, "Qwen3-Coder-30B-A3B-Instruct"),
    Variant("qwen3_30b_a3b", "qwen3_moe", 30.5e9, 3.3e9, 128, 8, 48, "Qwen3-30B-A3B"),
    Variant("gpt_oss_20b", "gpt_oss", 21e9, 3.6e9, 32, 4, 24, "OpenAI gpt-oss-20b"),
    Variant("gpt_oss_120b", "gpt_oss", 117e9, 5.1e9, 128, 4, 36, "OpenAI gpt-oss-120b"),
    Variant("glm45_air", "glm4_moe", 106e9, 12e9, 128, 8, 46, "GLM-4.5-Air"),
    Variant("glm45", "glm4_moe", 355e9, 32e9, 160, 8, 92, "GLM-4.5"),
    Variant("deepseek_v3", "deepseek_v3", 671e9, 37e9, 256, 8, 61, "DeepSeek-V3 / V3.1"),
    Variant("deepseek_v25", "deepseek_v2", 236e9, 21e9, 160, 6, 60, "DeepSeek-V2.5 / V2 (group-limited greedy router)"),
    Variant("deepseek_coder_v2_lite", "deepseek_v2", 15.7e9, 2.4e9, 64, 6, 27, "DeepSeek-Coder-V2-Lite-Instruct"),
    Variant("mixtral_8x7b", "mixtral", 46.7e9, 12.9e9, 8, 2, 32, "Mixtral-8x7B"),
)}


def preset(name: str) -> Variant | None:
    return VARIANTS.get(name)


def check_variant(name: str, args: Any, num_experts: int, top_k: int) -> list[str]:
    """Mismatches between the variant `name` and a loaded model (`args`: its `ModelArgs`, or None
    when unknown); empty for a free-form name or a match."""
    v = VARIANTS.get(name)
    if v is None or args is None:
        return []
    fix = f"set model_deployment.variant to the loaded model's (known: {', '.join(VARIANTS)}) or load {v.note or v.name}"
    out = []
    if args.family != v.family:
        out.append(f"model_deployment.variant {name!r} is a {v.family} model but the checkpoint is {args.family}; {fix}")
    for what, want, got in (("routed experts", v.num_experts, num_experts), ("experts per token", v.top_k, top_k),
                            ("layers", v.layers, args.n_layers)):
        if want is not None and want != got:
            out.append(f"model_deployment.variant {name!r} has {want} {what} but the checkpoint has {got}; {fix}")
    return out
