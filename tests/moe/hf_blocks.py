"""Tiny random transformers MoE blocks for the equivalence tests (no download)."""

from __future__ import annotations

import torch

H, INTER, E, K = 32, 48, 8, 2


def _init(block: torch.nn.Module, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in block.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.rand(b.shape, generator=g) * 0.1)
    return block.eval()


def hf_block(family: str, impl: str = "eager", seed: int = 0, **over) -> torch.nn.Module:
    if family == "mixtral":
        from transformers.models.mixtral.configuration_mixtral import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock as B

        cfg = MixtralConfig(hidden_size=H, intermediate_size=INTER, num_local_experts=E, num_experts_per_tok=K, **over)
    elif family == "qwen2_moe":
        from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig
        from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock as B

        cfg = Qwen2MoeConfig(
            hidden_size=H, moe_intermediate_size=INTER, shared_expert_intermediate_size=2 * INTER,
            num_experts=E, num_experts_per_tok=K, **over,
        )
    elif family == "qwen3_moe":
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock as B

        cfg = Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=INTER, num_experts=E, num_experts_per_tok=K, **over)
    elif family == "olmoe":
        from transformers.models.olmoe.configuration_olmoe import OlmoeConfig
        from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock as B

        cfg = OlmoeConfig(hidden_size=H, intermediate_size=INTER, num_experts=E, num_experts_per_tok=K, **over)
    elif family == "deepseek_v3":
        from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE as B

        kw = dict(
            hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=E, num_experts_per_tok=K,
            n_group=4, topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        )
        kw.update(over)
        cfg = DeepseekV3Config(**kw)
    elif family == "deepseek_v2":  # DeepSeek-V2 / V2.5: softmax scores, group-limited greedy (4 groups, 2 kept)
        from transformers.models.deepseek_v2.configuration_deepseek_v2 import DeepseekV2Config
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Moe as B

        kw = dict(
            hidden_size=H, moe_intermediate_size=INTER, n_routed_experts=E, num_experts_per_tok=K,
            n_group=4, topk_group=2, topk_method="group_limited_greedy", n_shared_experts=1,
            routed_scaling_factor=2.5,
        )
        kw.update(over)
        cfg = DeepseekV2Config(**kw)
    else:
        raise KeyError(family)
    cfg._experts_implementation = impl
    return _init(B(cfg), seed)


FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3"]
