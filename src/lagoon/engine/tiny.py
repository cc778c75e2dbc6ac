"""Tiny random checkpoints for tests and demos: `save_tiny_model(folder, family)` writes a HF folder
(config.json, safetensors, a byte-level tokenizer with a ChatML + tools chat template) that
`lagoon.engine.load_model` and `transformers` both load. Nothing is downloaded.

The weights are random (seeded), so the text is noise; what these models prove is that loading,
caching, sampling and serving match transformers exactly. They are *not* useful language models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["save_tiny_model", "byte_tokenizer", "TINY_FAMILIES", "CHATML_TOOLS_TEMPLATE"]

CHATML_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "You may call functions. <tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>\n"
    "Reply with <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call>.<|im_end|>\n"
    "{%- for m in messages %}{% if not (loop.first and m.role == 'system') %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
    "{%- else %}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% endif %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer() -> Any:
    """A byte-level tokenizer: 256 byte tokens + 3 specials (ids 256..258), ChatML template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_map = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(byte_map, key=lambda c: _byte_of(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = CHATML_TOOLS_TEMPLATE
    return fast


def _byte_of(ch: str) -> int:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {v: k for k, v in bytes_to_unicode().items()}[ch]


def _config(family: str, vocab: int, **over: Any) -> Any:
    import transformers as tf

    common = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6, eos_token_id=258, bos_token_id=257,
        pad_token_id=256, tie_word_embeddings=False,
    )
    moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    table = {
        "llama": (tf.LlamaConfig, {}),
        "qwen2": (tf.Qwen2Config, {"tie_word_embeddings": True}),
        "qwen3": (tf.Qwen3Config, {"head_dim": 16}),
        "mixtral": (tf.MixtralConfig, {"num_local_experts": 4, "num_experts_per_tok": 2}),
        "qwen2_moe": (tf.Qwen2MoeConfig, {**moe, "shared_expert_intermediate_size": 48}),
        "qwen3_moe": (tf.Qwen3MoeConfig, {**moe, "norm_topk_prob": True, "head_dim": 16}),
        "olmoe": (tf.OlmoeConfig, {**moe, "intermediate_size": 32}),
        # 3 layers, the first dense; grouped sigmoid router (2 groups of 4, 1 kept); half-rotary heads
        "glm4_moe": (tf.Glm4MoeConfig, {
            "num_hidden_layers": 3, "head_dim": 16, "n_routed_experts": 8, "num_experts_per_tok": 2,
            "moe_intermediate_size": 24, "n_shared_experts": 1, "n_group": 2, "topk_group": 1,
            "first_k_dense_replace": 1, "routed_scaling_factor": 1.5, "use_qk_norm": True, "intermediate_size": 72,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}}),
        # sliding (window 5) / full layers with their own RoPE (full: YaRN, half rotary), per-layer
        # query heads, softcapped sigmoid router, shared expert, dense first layer
        "laguna": (tf.LagunaConfig, {
            "num_hidden_layers": 4, "head_dim": 16, "num_experts": 6, "num_experts_per_tok": 2,
            "moe_intermediate_size": 20, "shared_expert_intermediate_size": 24, "intermediate_size": 72,
            "layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            "num_attention_heads_per_layer": [4, 6, 2, 4], "mlp_layer_types": ["dense", "sparse", "sparse", "sparse"],
            "sliding_window": 5, "moe_router_logit_softcapping": 2.0, "moe_routed_scaling_factor": 1.5,
            "rope_parameters": {
                "full_attention": {"rope_type": "yarn", "rope_theta": 500000.0, "partial_rotary_factor": 0.5,
                                   "factor": 4.0, "original_max_position_embeddings": 128},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}),
        # sliding (window 5) / full / sliding with sinks, biased router and clamped-SwiGLU experts, YaRN
        "gpt_oss": (tf.GptOssConfig, {
            "num_hidden_layers": 3, "head_dim": 16, "num_local_experts": 5, "num_experts_per_tok": 2,
            "intermediate_size": 40, "sliding_window": 5, "swiglu_limit": 1.5,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
                                "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 128}}),
        # MLA (q low-rank, kv latent 24 + rope 8), grouped sigmoid router, shared expert, first layer dense
        "deepseek_v3": (tf.DeepseekV3Config, {
            "num_hidden_layers": 3, "n_routed_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 24,
            "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "first_k_dense_replace": 1,
            "routed_scaling_factor": 1.5, "intermediate_size": 72, "q_lora_rank": 40, "kv_lora_rank": 24,
            "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 20, "num_key_value_heads": 4,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 1.0,
                                "mscale_all_dim": 1.0, "original_max_position_embeddings": 128}}),
        # DeepSeek-V2 / V2.5: the same MLA network (plain q_proj, as V2-Lite) with a softmax router,
        # group-limited greedy over 4 groups of 2 (2 kept), no renormalisation, routed scaling
        "deepseek_v2": (tf.DeepseekV2Config, {
            "num_hidden_layers": 3, "n_routed_experts": 8, "num_experts_per_tok": 3, "moe_intermediate_size": 24,
            "n_shared_experts": 1, "n_group": 4, "topk_group": 2, "topk_method": "group_limited_greedy",
            "first_k_dense_replace": 1, "routed_scaling_factor": 1.5, "intermediate_size": 72, "q_lora_rank": None,
            "kv_lora_rank": 24, "qk_nope_head_dim": 12, "qk_rope_head_dim": 8, "v_head_dim": 20,
            "num_key_value_heads": 4,
            "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.707,
                                "mscale_all_dim": 0.707, "original_max_position_embeddings": 128}}),
    }
    if family not in table:
        raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(table)}")
    cls, extra = table[family]
    return cls(**{**common, **extra, **over})


TINY_FAMILIES = ("llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "glm4_moe", "laguna", "gpt_oss",
                 "deepseek_v2", "deepseek_v3")


def save_tiny_model(folder: str | Path, family: str = "llama", *, seed: int = 0, vocab: int = 320, **config: Any) -> Path:
    """Write a random tiny `family` model + tokenizer to `folder`; returns the folder."""
    import torch
    from transformers import AutoModelForCausalLM

    folder = Path(folder)
    torch.manual_seed(seed)
    cfg = _config(family, vocab, **config)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # HF's init is tiny (std 0.02): widen it so logits are not all alike
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.endswith("e_score_correction_bias"):  # HF starts it at zero: make selection depend on it
                t.normal_(0, 0.1)
            elif family == "gpt_oss" and t.dim() == 1 and name.endswith(("bias", "sinks")):
                t.normal_(0, 0.5)  # sinks and biases start at zero too
    model.save_pretrained(str(folder))
    byte_tokenizer().save_pretrained(str(folder))
    return folder
