"""A plain decoder-only `Transformer` (gpt-fast style): one model definition for every family
Lagoon runs, each layer built from its `LayerSpec` (see `lagoon.model.args`) — dense or MoE MLP
(`lagoon.moe.SparseMoE`), full or sliding-window attention, optional softplus output gate, its own
RoPE table (partial rotary allowed), attention sinks (gpt-oss).

Module names follow the HF checkpoints (`embed_tokens`, `layers.N.self_attn.q_proj`, `mlp.gate_proj`,
`input_layernorm` …) so a HF state dict maps onto it with the `model.` prefix dropped.

The KV cache is injected: `forward(tokens, input_pos, cache)` where `cache` (see
`lagoon.engine.kv_cache`) has been `prepare`d for this step and each attention layer calls
`cache.update(layer, k, v) -> (k_all, v_all, mask)`; key j of what it returns is absolute position
j, so a sliding-window layer narrows the mask itself and every cache serves it unchanged. A layer
switched from outside (`decode_isa`, `lagoon.engine.kv_cache.use_native_attention`) decodes (T = 1)
through `cache.attend(layer, q, k, v, positions, isa)` instead: write, then Lagoon's attention kernel
over the cache in place. Without a cache the layer attends causally within `tokens` only. The model never branches on quantization,
offloading or compile; those swap modules from outside.

Shapes: B = batch, T = new tokens, S = attended keys, H = heads, K = kv heads, D = head dim,
R = rotated channels, M = model dim, V = vocab.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.model.args import ModelArgs
from lagoon.model.rope import apply_rope, attention_scaling, inv_freq
from lagoon.protocols import CacheLike

__all__ = ["Transformer", "RMSNorm", "Attention", "MLP", "Step", "rope_inv_freq", "CacheLike"]


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


def rope_inv_freq(args: ModelArgs, table: str | None = None) -> torch.Tensor:
    """Inverse frequencies [R/2] of one of the checkpoint's RoPE tables (the first by default)."""
    return inv_freq(args.rope_table(table) if table else args.ropes[0][1])


@dataclass
class Step:
    """What every layer of one forward step shares: absolute positions [B, T] and, per RoPE table,
    (cos, sin) [B, 1, T, R]."""

    positions: torch.Tensor
    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]

    def window_mask(self, window: int, n_keys: int) -> torch.Tensor:
        """Keys (absolute positions 0..n_keys-1) within `window` of each query: [B, 1, T, S] bool."""
        keys = torch.arange(n_keys, device=self.positions.device)
        return (keys[None, None, :] > self.positions[:, :, None] - window)[:, None]

    def local_mask(self, window: int | None) -> torch.Tensor:
        """Causal (and windowed) mask among the step's own tokens: [B, 1, T, T] bool."""
        p = self.positions
        keep = p[:, None, :] <= p[:, :, None]  # [B, T, T]
        if window is not None:
            keep = keep & (p[:, None, :] > p[:, :, None] - window)
        return keep[:, None]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        spec = args.layers[layer]
        self.layer, self.window, self.rope = layer, spec.window, spec.rope
        self.n_heads, self.n_kv, self.head_dim = spec.n_heads, spec.n_kv_heads, spec.head_dim
        q_out, kv_out = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
        self.clip_qkv = args.clip_qkv
        self.q_proj = nn.Linear(args.dim, q_out, bias=args.qkv_bias)
        self.k_proj = nn.Linear(args.dim, kv_out, bias=args.qkv_bias)
        self.v_proj = nn.Linear(args.dim, kv_out, bias=args.qkv_bias)
        self.o_proj = nn.Linear(q_out, args.dim, bias=args.o_bias)
        self.qk_norm_full = args.qk_norm_full
        if args.qk_norm:
            qd, kd = (q_out, kv_out) if args.qk_norm_full else (spec.head_dim, spec.head_dim)
            self.q_norm: nn.Module | None = RMSNorm(qd, args.norm_eps)
            self.k_norm: nn.Module | None = RMSNorm(kd, args.norm_eps)
        else:
            self.q_norm = self.k_norm = None
        self.gate_per_head = spec.output_gate == "head"
        self.g_proj = None if spec.output_gate is None else nn.Linear(
            args.dim, spec.n_heads if self.gate_per_head else q_out, bias=False)
        self.sinks = nn.Parameter(torch.zeros(spec.n_heads)) if spec.sinks else None  # [H]
        # one linear for q, k and v, set from outside (`gguf_linear.fuse_projections`): one kernel call
        self.qkv_proj: nn.Module | None = None
        self.qkv_split = (q_out, kv_out, kv_out)
        # decode (T = 1) through `cache.attend` on Lagoon's kernel for this ISA, set from outside
        # (`kv_cache.use_native_attention`); None: SDPA over what `cache.update` gathers
        self.decode_isa: str | None = None

    def forward(self, x: torch.Tensor, step: Step, cache: CacheLike | None) -> torch.Tensor:
        B, T, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)
        else:
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
        cos, sin = step.rope[self.rope]
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, T, D]
        k = apply_rope(k.transpose(1, 2), cos, sin)  # [B, K, T, D]
        v = v.transpose(1, 2)
        gqa = self.n_kv != self.n_heads
        if cache is not None and self.decode_isa is not None and T == 1:
            out = cache.attend(self.layer, q, k, v, step.positions, self.decode_isa)  # [B, H, 1, D]
        elif cache is not None:
            k, v, mask = cache.update(self.layer, k, v)  # [B, K, S, D] x2, [B, 1, T, S] bool
            if self.window is not None:
                mask = mask & step.window_mask(self.window, k.shape[2])
            out = (F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa) if self.sinks is None
                   else self._sink_attention(q, k, v, mask))
        elif self.sinks is not None:
            out = self._sink_attention(q, k, v, step.local_mask(self.window))
        elif self.window is not None and T > 1:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.local_mask(self.window), enable_gqa=gqa)
        else:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=gqa)
        out = out.transpose(1, 2)  # [B, T, H, D]
        if self.g_proj is not None:  # Laguna: softplus gate on each head (or each channel) of the output
            gate = F.softplus(self.g_proj(x).float()).to(out.dtype)
            out = out * (gate.unsqueeze(-1) if self.gate_per_head else gate.view(B, T, self.n_heads, self.head_dim))
        return self.o_proj(out.reshape(B, T, self.n_heads * self.head_dim))


    def _sink_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Softmax over the keys and one learned sink logit per head, whose share is dropped (gpt-oss)."""
        B, H, T, D = q.shape
        rep = self.n_heads // self.n_kv
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # [B, H, S, D]
        scores = (q @ k.transpose(-1, -2)) * D**-0.5  # [B, H, T, S]
        scores = scores.masked_fill(~mask, float("-inf"))
        sink = self.sinks.to(scores.dtype).view(1, H, 1, 1).expand(B, H, T, 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(dim=-1)[..., :-1]  # [B, H, T, S]
        return probs @ v  # [B, H, T, D]


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str = "silu") -> None:
        super().__init__()
        from lagoon.moe.experts import activation  # lazy: model <- moe

        self.act_fn = activation(act)
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one linear, set from outside

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
            return self.down_proj(self.act_fn(gate) * up)
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def _moe_block(args: ModelArgs) -> nn.Module:
    from lagoon.moe import SparseMoE  # lazy: model <- moe

    kw: dict[str, Any] = {
        "scoring": args.scoring,
        "norm_topk_prob": args.norm_topk_prob,
        "n_group": args.n_group,
        "topk_group": args.topk_group,
        "routed_scaling_factor": args.routed_scaling_factor,
        "act": args.hidden_act,
        "weighting": args.expert_weighting,
    }
    if args.shared_intermediate_size:
        kw["shared_intermediate_size"] = args.shared_intermediate_size
        kw["shared_expert_gate"] = args.shared_expert_gate
    moe = SparseMoE(args.dim, args.moe_intermediate_size, args.num_experts, args.top_k, **kw)
    moe.router.logit_softcap = args.router_softcap
    if args.router_bias:
        moe.router.bias = nn.Parameter(torch.zeros(args.num_experts))
    if args.expert_glu != "gated" or args.expert_bias:
        from lagoon.moe.experts import GLU, Experts

        glu = GLU(args.hidden_act, args.expert_glu, args.glu_alpha, args.glu_limit)
        moe.experts = Experts(args.num_experts, args.dim, args.moe_intermediate_size, args.hidden_act,
                              moe.experts.impl, glu=glu, bias=args.expert_bias)
    return moe


def _attention(args: ModelArgs, layer: int) -> nn.Module:
    if args.layers[layer].attention == "mla":
        from lagoon.model.mla import MLAttention  # lazy: mla <- transformer (RMSNorm, Step)

        return MLAttention(args, layer)
    return Attention(args, layer)


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int) -> None:
        super().__init__()
        self.self_attn = _attention(args, layer)
        self.mlp = _moe_block(args) if args.is_moe_layer(layer) else MLP(args.dim, args.intermediate_size, args.hidden_act)
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)

    def forward(self, x: torch.Tensor, step: Step, cache: CacheLike | None) -> torch.Tensor:
        h = x + self.self_attn(self.input_layernorm(x), step, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        # built on the meta device (every checkpoint load), the embedding skips its normal_ init and the
        # RoPE tables their arithmetic: those meta kernels are Python decompositions, and the first
        # one called imports torch._dynamo (~0.8 s)
        meta = torch.get_default_device().type == "meta"
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim,
                                         _weight=torch.empty(args.vocab_size, args.dim) if meta else None)
        self.layers = nn.ModuleList(Block(args, i) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        self.rope_scale = {name: attention_scaling(spec) for name, spec in args.ropes}
        for name, spec in args.ropes:  # on meta only its shape: `reset_rope` computes it after the load
            self.register_buffer(f"inv_freq_{name}", torch.empty(-(-spec.dim // 2)) if meta else inv_freq(spec),
                                 persistent=False)

    def reset_rope(self) -> None:
        """Recompute the RoPE buffers (after building on the meta device)."""
        for name, spec in self.args.ropes:
            setattr(self, f"inv_freq_{name}", inv_freq(spec))

    def tie_weights(self) -> None:
        if self.args.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def rope(self, input_pos: torch.Tensor, dtype: torch.dtype, table: str = "default") -> tuple[torch.Tensor, torch.Tensor]:
        inv = getattr(self, f"inv_freq_{table}")
        freqs = input_pos[..., None].float() * inv.float()  # [B, T, R/2]
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # [B, 1, T, R]
        scale = self.rope_scale[table]
        return (emb.cos() * scale).to(dtype), (emb.sin() * scale).to(dtype)

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
        step = Step(input_pos, {name: self.rope(input_pos, x.dtype, name) for name, _ in self.args.ropes})
        for layer in self.layers:
            x = layer(x, step, cache)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))  # [B, T, V]
