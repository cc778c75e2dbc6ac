"""`MLAttention`: DeepSeek-V3's multi-head latent attention, a drop-in for `Attention` on layers
whose `LayerSpec.attention` is ``mla``.

Keys and values are compressed into one latent per token: ``kv_a_proj_with_mqa`` gives the
``kv_lora_rank`` latent (RMS-normed) and a ``qk_rope_head_dim`` key part shared by every head,
which is rotated. The KV cache stores exactly those two (``cache.update(layer, latent, k_rot)``,
widths from `ModelArgs.kv_cache_dims`), not per-head K/V: the per-head ``k_nope`` and ``v`` are
re-expanded from the cached latents with ``kv_b_proj`` at every step. The softmax scale is
``qk_head_dim^-0.5`` times YaRN's ``mscale²`` when the RoPE table sets ``mscale_all_dim``.

Shapes: B batch, T new tokens, S attended keys, H heads, R kv_lora_rank, P rope dim, N nope dim, V v dim.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.model.args import ModelArgs
from lagoon.model.rope import apply_rope
from lagoon.model.transformer import RMSNorm, Step
from lagoon.protocols import CacheLike

__all__ = ["MLAttention"]


class MLAttention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        spec = args.layers[layer]
        self.layer, self.window, self.rope = layer, spec.window, spec.rope
        self.n_heads = spec.n_heads
        self.nope, self.rot, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.rank, self.interleave = args.kv_lora_rank, args.rope_interleave
        qk = self.nope + self.rot
        if args.q_lora_rank:
            self.q_a_proj = nn.Linear(args.dim, args.q_lora_rank, bias=args.qkv_bias)
            self.q_a_layernorm = RMSNorm(args.q_lora_rank)
            self.q_b_proj = nn.Linear(args.q_lora_rank, self.n_heads * qk, bias=False)
            self.q_proj = None
        else:
            self.q_proj = nn.Linear(args.dim, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(args.dim, self.rank + self.rot, bias=args.qkv_bias)
        self.kv_a_layernorm = RMSNorm(self.rank)
        self.kv_b_proj = nn.Linear(self.rank, self.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.v_dim, args.dim, bias=args.o_bias)
        self.scale = qk**-0.5 * _mscale2(args.rope_table(spec.rope).params)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        if self.interleave:  # (x0, x1) pairs → halves: the same rotation as DeepSeek's interleaved form
            x = torch.cat((x[..., 0::2], x[..., 1::2]), dim=-1)
        return apply_rope(x, cos, sin)

    def forward(self, x: torch.Tensor, step: Step, cache: CacheLike | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_proj is not None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.nope + self.rot).transpose(1, 2)  # [B, H, T, N+P]
        q_pass, q_rot = q.split([self.nope, self.rot], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rot], dim=-1)  # [B, T, R], [B, T, P]
        latent = self.kv_a_layernorm(latent).view(B, 1, T, self.rank)
        cos, sin = step.rope[self.rope]
        q_rot = self._rotate(q_rot, cos, sin)
        k_rot = self._rotate(k_rot.view(B, 1, T, self.rot), cos, sin)  # [B, 1, T, P]
        if cache is not None:
            latent, k_rot, mask = cache.update(self.layer, latent, k_rot)  # [B, 1, S, R], [B, 1, S, P], [B, 1, T, S]
            if self.window is not None:
                mask = mask & step.window_mask(self.window, latent.shape[2])
        else:
            mask = step.local_mask(self.window)
        S = latent.shape[2]
        kv = self.kv_b_proj(latent[:, 0]).view(B, S, self.n_heads, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [B, H, S, N], [B, H, S, V]
        k = torch.cat((k_nope, k_rot.expand(B, self.n_heads, S, self.rot)), dim=-1)  # [B, H, S, N+P]
        q = torch.cat((q_pass, q_rot), dim=-1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)  # [B, H, T, V]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, self.n_heads * self.v_dim))


def _mscale2(rope: dict) -> float:
    """DeepSeek's softmax scale correction under YaRN: mscale(factor, mscale_all_dim)²."""
    m_all = rope.get("mscale_all_dim") or 0
    if rope.get("rope_type", "default") == "default" or not m_all:
        return 1.0
    factor = float(rope["factor"])
    m = 1.0 if factor <= 1 else 0.1 * float(m_all) * math.log(factor) + 1.0
    return m * m
