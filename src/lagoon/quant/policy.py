"""Token-type activation policy: which activation scale each token gets.

The engine tags every token it feeds the model: prompt tokens from system/user messages are
`CONTEXT`, tokens from tool messages are `TOOL_OUTPUT`, generated tokens are `REASONING`
(`types_for_roles` maps the per-token message roles of `ChatFormat.encode_with_roles`; assistant
turns replayed in a prompt were generated, so they are `REASONING` too; template text outside any
message and untagged prompts are `CONTEXT`).
Activation-quantized layers (w8a8, fp8) ask `activation_absmax` for one absmax per token:

- `REASONING` tokens are always scaled dynamically (their own per-token absmax).
- `CONTEXT` / `TOOL_OUTPUT` tokens use the layer's *static* range from calibration, unless
  the token's own absmax exceeds ``dynamic_threshold x static range``; then it is scaled dynamically
  instead (so an outlier token is never clipped by a stale static scale). ``dynamic_threshold = 0``
  makes every token dynamic; a layer or expert with no calibrated range (NaN) is dynamic too.

Tags travel by a context variable (`token_types(...)`) instead of through every forward signature,
so the model file never branches on quantization. A layer uses the tags only when their count
equals its flattened token count; otherwise every token is treated as reasoning (dynamic).

This module is *not* a quantizer: it only chooses ranges. The schemes turn ranges into scales.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from enum import IntEnum

import torch

from lagoon.errors import QuantizationError

__all__ = [
    "TokenType", "token_types", "current_token_types", "activation_absmax", "N_TOKEN_TYPES", "ROLE_TYPES",
    "types_for_roles", "reasoning_types",
]


class TokenType(IntEnum):
    CONTEXT = 0
    TOOL_OUTPUT = 1
    REASONING = 2


N_TOKEN_TYPES = len(TokenType)

ROLE_TYPES: dict[str, TokenType] = {
    "system": TokenType.CONTEXT,
    "developer": TokenType.CONTEXT,
    "user": TokenType.CONTEXT,
    "tool": TokenType.TOOL_OUTPUT,
    "function": TokenType.TOOL_OUTPUT,
    "ipython": TokenType.TOOL_OUTPUT,
    "assistant": TokenType.REASONING,
}
"""Message role -> token type; a role not listed (and None: template text) is CONTEXT."""


def types_for_roles(roles: Sequence[str | None]) -> list[int]:
    """Per-token message roles -> TokenType codes (see `ROLE_TYPES`)."""
    return [int(ROLE_TYPES.get(r, TokenType.CONTEXT)) if r is not None else int(TokenType.CONTEXT) for r in roles]

_TYPES: ContextVar[torch.Tensor | None] = ContextVar("lagoon_token_types", default=None)


@contextmanager
def token_types(types: torch.Tensor | Sequence[int | TokenType] | None) -> Iterator[None]:
    """Tag the tokens of the forward passes run inside this block (flattened batch x seq order)."""
    trusted = torch.is_tensor(types) and _REASONING.get(types.numel()) is types  # from reasoning_types
    t = None if types is None else torch.as_tensor([int(v) for v in types] if not torch.is_tensor(types) else types)
    if t is not None and not trusted:
        t = t.reshape(-1).to(torch.int64)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= N_TOKEN_TYPES):
            raise QuantizationError(f"token types must be in 0..{N_TOKEN_TYPES - 1} ({[m.name for m in TokenType]})")
    tok = _TYPES.set(t)
    try:
        yield
    finally:
        _TYPES.reset(tok)


_REASONING: dict[int, torch.Tensor] = {}


def reasoning_types(n: int) -> torch.Tensor:
    """`n` REASONING tags (a decode step's tokens), built once per `n`: `token_types` takes them
    without re-checking (building and checking a fresh tensor cost ~28 us of each decode step)."""
    t = _REASONING.get(n)
    if t is None:
        t = _REASONING[n] = torch.full((n,), int(TokenType.REASONING), dtype=torch.int64)
    return t


def current_token_types(m: int) -> torch.Tensor | None:
    """The active tags if there are exactly `m` of them, else None (treat all as reasoning)."""
    t = _TYPES.get()
    return t if t is not None and t.numel() == m else None


def activation_absmax(
    x: torch.Tensor,
    static_absmax: torch.Tensor | None,
    dynamic_threshold: float,
    types: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token range for `x` [M, K] and which tokens were scaled dynamically.

    `static_absmax` is [N_TOKEN_TYPES] (NaN = not calibrated) or None. Returns (absmax [M, 1] fp32,
    dynamic [M] bool)."""
    own = x.detach().abs().amax(dim=-1).float().clamp_min(1e-8)  # [M]
    m = own.shape[0]
    if static_absmax is None or types is None or dynamic_threshold <= 0:
        return own.unsqueeze(-1), torch.ones(m, dtype=torch.bool, device=x.device)
    static = static_absmax.to(own.device, torch.float32)[types.to(own.device)]  # [M]
    dynamic = (types == TokenType.REASONING) | torch.isnan(static) | (own > dynamic_threshold * static)
    absmax = torch.where(dynamic, own, static)
    return absmax.unsqueeze(-1), dynamic
