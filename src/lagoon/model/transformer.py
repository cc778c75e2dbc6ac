"""A plain decoder-only `Transformer` (gpt-fast style) for the llama / qwen2 / qwen3 families and,
through `lagoon.moe.SparseMoE`, their MoE cousins.

Module names follow the HF checkpoints (`embed_tokens`, `layers.N.self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm` …) so a HF state dict maps onto it with the `model.` prefix dropped.

The KV cache is injected: `forward(tokens, input_pos, cache)` where `cache` (see
`lagoon.engine.kv_cache`) has been `prepare`d for this step and each attention layer calls
`cache.update(layer, k, v) -> (k_all, v_all, mask)`. Without a cache the layer attends causally
within `tokens` only. The model never branches on quantization, offloading or compile; those swap
modules from outside.

Shapes: B = batch, T = new tokens, S = attended keys, H = heads, K = kv heads, D = head dim,
M = model dim, V = vocab.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.errors import UnsupportedModelError
from lagoon.model.args import ModelArgs
from lagoon.protocols import CacheLike

__all__ = ["Transformer", "RMSNorm", "Attention", "MLP", "rope_inv_freq", "CacheLike"]

ROPE_TYPES = ("default", "linear", "llama3")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [D/2] for the checkpoint's RoPE variant."""
    d = args.head_dim
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))
    rope = args.rope
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(rope["factor"])
    if kind == "llama3":
        factor = float(rope["factor"])
        low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
        old_ctx = float(rope["original_max_position_embeddings"])
        low_wl, high_wl = old_ctx / low, old_ctx / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wl) & ~(wavelen > low_wl)
        return torch.where(medium, smoothed, scaled)
    raise UnsupportedModelError(f"RoPE type {kind!r} is not supported; Lagoon runs: {', '.join(ROPE_TYPES)}")


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x [B, H, T, D]; cos/sin [B, 1, T, D] (HF "rotate_half" layout)
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.clip_qkv = args.clip_qkv
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=args.qkv_bias)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=args.o_bias)
        self.qk_norm_full = args.qk_norm_full
        if args.qk_norm:
            qd, kd = (args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim) if args.qk_norm_full else (
                args.head_dim, args.head_dim)
            self.q_norm: nn.Module | None = RMSNorm(qd, args.norm_eps)
            self.k_norm: nn.Module | None = RMSNorm(kd, args.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheLike | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)  # [B, T, H*D], [B, T, K*D] x2
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        if self.q_norm is not None and self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if self.q_norm is not None and not self.qk_norm_full:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, K, T, D]
        v = v.transpose(1, 2)
        if cache is not None:
            k, v, mask = cache.update(self.layer, k, v)  # [B, K, S, D] x2, [B, 1, T, S] bool
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=self.n_kv != self.n_heads)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=self.n_kv != self.n_heads)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def _moe_block(args: ModelArgs) -> nn.Module:
    from lagoon.moe import SparseMoE  # lazy: model <- moe

    kw: dict[str, Any] = {
        "scoring": "softmax",
        "norm_topk_prob": args.norm_topk_prob,
    }
    if args.shared_intermediate_size:
        kw["shared_intermediate_size"] = args.shared_intermediate_size
        kw["shared_expert_gate"] = True
    return SparseMoE(args.dim, args.moe_intermediate_size, args.num_experts, args.top_k, **kw)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(args, layer)
        self.mlp = _moe_block(args) if args.is_moe_layer(layer) else MLP(args.dim, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheLike | None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, input_pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = input_pos[..., None].float() * self.inv_freq.float()  # [B, T, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, D]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(
        self,
        tokens: torch.Tensor,
        input_pos: torch.Tensor | None = None,
        cache: CacheLike | None = None,
        *,
        last_only: bool = False,
    ) -> torch.Tensor:
        """tokens [B, T], input_pos [B, T] (absolute positions) → logits [B, T, V] (or [B, 1, V])."""
        B, T = tokens.shape
        if input_pos is None:
            input_pos = torch.arange(T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)  # [B, T, M]
        cos, sin = self.rope(input_pos, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # [B, T, V]
