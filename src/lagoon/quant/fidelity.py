"""Fidelity of a quantized model against its float original: what quantization cost.

- `layer_fidelity`: per quantized layer, the SQNR of its output on the activations that really
  flow through the float model over a text (inputs captured from the float model — with their
  token-type tags, if any — and fed to both the float and the quantized layer, so each layer's own
  error is measured in isolation).
  SQNR = 20·log10(‖ref‖ / ‖ref − q‖) dB. For stacked MoE experts it is also reported per expert,
  on the tokens routed to that expert, with the worst expert named (a pooled number hides a bad
  expert: one shared scale over experts of different magnitude can look fine pooled).
- `text_fidelity`: over a token sequence, mean KL(P_float ‖ P_quant) of the next-token
  distributions, top-1 agreement, and the perplexity of both models and its delta — what
  llama.cpp's ``perplexity --kl-divergence`` reports.

Both models are called as ``logits_fn(ids [1, T]) -> logits [1, T, V]`` (an HF model's output
object with ``.logits`` works too). The text is scored in independent windows of `window` tokens.
Not a benchmark of speed; see ``benchmarks/bench_quant.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lagoon.quant.policy import current_token_types, token_types

__all__ = [
    "HELDOUT_TEXT", "TRANSCRIPT", "POLICIES", "TypeFidelity", "PolicyFidelity", "typed_fidelity", "token_type_report", "sqnr_db", "LayerFidelity", "TextFidelity", "layer_fidelity", "text_fidelity", "logits_of", "FORMAT_VERSION",
]

FORMAT_VERSION = 1
HELDOUT_TEXT = Path(__file__).resolve().parent / "data" / "heldout.txt"
"""The shipped held-out text `lagoon quant fidelity` scores by default (never used to calibrate)."""


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """20·log10(‖ref‖ / ‖ref − test‖); inf when identical."""
    ref, test = ref.double(), test.double()
    err = (ref - test).norm().item()
    return math.inf if err == 0 else 20.0 * math.log10(max(ref.norm().item(), 1e-300) / err)


@dataclass
class LayerFidelity:
    name: str
    kind: str  # QuantizedLinear | QuantizedExperts
    sqnr_db: float
    tokens: int
    expert_sqnr_db: list[float | None] | None = None  # None where an expert got no tokens
    expert_tokens: list[int] | None = None
    worst_expert: int | None = None


@dataclass
class TextFidelity:
    tokens: int
    mean_kl: float
    top1_agreement: float
    ppl_float: float
    ppl_quant: float
    ppl_delta: float  # ppl_quant - ppl_float
    ppl_delta_pct: float


@dataclass
class FidelityReport:
    layers: list[LayerFidelity] = field(default_factory=list)
    text: TextFidelity | None = None
    token_types: list[PolicyFidelity] = field(default_factory=list)
    against_gguf: TextFidelity | None = None  # llama.cpp on a GGUF file, same text and ids (--against-gguf)
    meta: dict[str, Any] = field(default_factory=dict)

    def worst_layer(self) -> LayerFidelity | None:
        return min(self.layers, key=lambda lf: lf.sqnr_db, default=None)

    def to_dict(self) -> dict[str, Any]:
        worst = self.worst_layer()
        d = {"format_version": FORMAT_VERSION, **asdict(self), "worst_layer": worst.name if worst else None}
        return json_safe(d)


def json_safe(x: Any) -> Any:
    """Infinite / NaN floats become strings so the report stays valid JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [json_safe(v) for v in x]
    return x


def logits_of(model: Callable[[torch.Tensor], Any]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Wrap a model so it returns a logits tensor [B, T, V] (HF outputs carry `.logits`)."""

    def fn(ids: torch.Tensor) -> torch.Tensor:
        out = model(ids)
        return out.logits if hasattr(out, "logits") else out

    return fn


def _float_expert(mod: nn.Module, e: int, x: torch.Tensor) -> torch.Tensor:
    act = getattr(mod, "act_fn", None) or F.silu
    gate, up = F.linear(x, mod.gate_up_proj[e].float()).chunk(2, dim=-1)
    return F.linear(act(gate) * up, mod.down_proj[e].float())


@torch.no_grad()
def layer_fidelity(
    float_model: nn.Module,
    quant_model: nn.Module,
    batches: Iterable[torch.Tensor],
    max_tokens: int = 1024,
) -> list[LayerFidelity]:
    """SQNR of every quantized layer of `quant_model` on inputs captured from `float_model`."""
    from lagoon.quant.experts import QuantizedExperts
    from lagoon.quant.linear import QuantizedLinear

    qmods = {n: m for n, m in quant_model.named_modules() if isinstance(m, (QuantizedLinear, QuantizedExperts))}
    fmods = dict(float_model.named_modules())
    captured: dict[str, list[tuple[torch.Tensor, ...]]] = {n: [] for n in qmods}
    seen: dict[str, int] = dict.fromkeys(qmods, 0)

    def hook(name: str) -> Callable[..., None]:
        def fn(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if seen[name] >= max_tokens:
                return
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            take = min(x.shape[0], max_tokens - seen[name])
            seen[name] += take
            types = current_token_types(x.shape[0])
            types = torch.full((take,), -1) if types is None else types[:take].clone()  # -1: untagged
            extra = (args[1][:take],) if isinstance(qmods[name], QuantizedExperts) else ()
            captured[name].append((x[:take].clone(), types, *extra))

        return fn

    handles = [fmods[n].register_forward_pre_hook(hook(n)) for n in qmods if n in fmods]
    try:
        for ids in batches:
            float_model(ids)
    finally:
        for h in handles:
            h.remove()

    out: list[LayerFidelity] = []
    for name, q in qmods.items():
        if not captured[name]:
            continue
        f = fmods[name]
        x = torch.cat([c[0] for c in captured[name]])  # [M, K]
        tt = torch.cat([c[1] for c in captured[name]])  # [M], -1 where untagged
        types = None if bool((tt < 0).any()) else tt
        if isinstance(q, QuantizedLinear):
            ref = F.linear(x, f.weight.float(), None if f.bias is None else f.bias.float())
            with token_types(types):
                y = q(x)
            out.append(LayerFidelity(name, "QuantizedLinear", sqnr_db(ref, y), x.shape[0]))
            continue
        idx = torch.cat([c[2] for c in captured[name]])  # [M, k]
        refs, qs, per, toks = [], [], [], []
        for e in range(q.num_experts):
            tok = (idx == e).any(-1).nonzero().squeeze(-1)
            toks.append(int(tok.numel()))
            if tok.numel() == 0:
                per.append(None)
                continue
            r = _float_expert(f, e, x[tok])
            y = q.expert_forward(e, x[tok], None if types is None else types[tok]).float()
            refs.append(r)
            qs.append(y)
            per.append(sqnr_db(r, y))
        valid = [(s, e) for e, s in enumerate(per) if s is not None]
        worst = min(valid)[1] if valid else None
        pooled = sqnr_db(torch.cat(refs), torch.cat(qs)) if refs else math.nan
        out.append(LayerFidelity(name, "QuantizedExperts", pooled, x.shape[0], per, toks, worst))
    return out


@torch.no_grad()
def text_fidelity(
    float_fn: Callable[[torch.Tensor], torch.Tensor],
    quant_fn: Callable[[torch.Tensor], torch.Tensor],
    ids: torch.Tensor,
    window: int = 256,
) -> TextFidelity:
    """KL, top-1 agreement and perplexities over `ids` [T], scored in windows of `window` tokens."""
    ids = ids.reshape(-1)
    kl_sum = agree = nll_f = nll_q = 0.0
    n = 0
    for s in range(0, ids.numel() - 1, window):
        chunk = ids[s : s + window + 1]
        if chunk.numel() < 2:
            break
        inp, tgt = chunk[:-1].unsqueeze(0), chunk[1:]  # [1, W], [W]
        lf = F.log_softmax(float_fn(inp)[0].double(), -1)  # [W, V]
        lq = F.log_softmax(quant_fn(inp)[0].double(), -1)
        kl_sum += (lf.exp() * (lf - lq)).sum(-1).sum().item()
        agree += (lf.argmax(-1) == lq.argmax(-1)).sum().item()
        nll_f -= lf.gather(-1, tgt[:, None]).sum().item()
        nll_q -= lq.gather(-1, tgt[:, None]).sum().item()
        n += tgt.numel()
    if n == 0:
        raise ValueError("text_fidelity needs at least 2 tokens")
    pf, pq = math.exp(nll_f / n), math.exp(nll_q / n)
    return TextFidelity(n, kl_sum / n, agree / n, pf, pq, pq - pf, 100.0 * (pq - pf) / pf)


# -- fidelity per token type ---------------------------------------------------------------------
# The scored position t predicts token t+1; it counts for the type of the token it predicts (how
# well the quantized model predicts context, tool output and reasoning tokens). What differs between
# the policies is the activation scale of each *input* token:
#   all-dynamic  every token its own per-token scale (no tags)
#   all-static   every token the calibrated static range (reasoning tokens take the context range),
#                never dynamic (threshold inf)
#   policy       the seed's rule: reasoning dynamic, context / tool static below the threshold
POLICIES = ("all-dynamic", "all-static", "policy")
TRANSCRIPT = Path(__file__).resolve().parent / "data" / "transcript.json"
"""A real agent transcript (see its ``source``): system, user, assistant and tool messages."""


@dataclass
class TypeFidelity:
    token_type: str  # TokenType name
    tokens: int
    mean_kl: float
    top1_agreement: float


@dataclass
class PolicyFidelity:
    policy: str
    per_type: list[TypeFidelity]
    dynamic_fraction: float  # of the activation-quantized Linears' token rows scaled dynamically (NaN: none)


@torch.no_grad()
def typed_fidelity(
    float_logits: torch.Tensor, quant_logits: torch.Tensor, types: torch.Tensor
) -> list[TypeFidelity]:
    """Logits [T, V] of both models over one sequence whose tokens have `types` [T]: KL and top-1 of
    positions 0..T-2, grouped by the type of the token each predicts (types[1:])."""
    from lagoon.quant.policy import TokenType

    lf = F.log_softmax(float_logits[:-1].double(), -1)  # [T-1, V]
    lq = F.log_softmax(quant_logits[:-1].double(), -1)
    kl = (lf.exp() * (lf - lq)).sum(-1)  # [T-1]
    agree = lf.argmax(-1) == lq.argmax(-1)
    target = types.reshape(-1)[1:]
    out = []
    for t in TokenType:
        sel = target == int(t)
        n = int(sel.sum())
        out.append(TypeFidelity(t.name, n, kl[sel].mean().item() if n else math.nan, agree[sel].float().mean().item() if n else math.nan))
    return out


def _set_threshold(model: nn.Module, value: float | None, saved: dict[str, float]) -> None:
    from lagoon.quant.experts import QuantizedExperts
    from lagoon.quant.linear import QuantizedLinear

    for name, m in model.named_modules():
        if isinstance(m, (QuantizedLinear, QuantizedExperts)):
            if value is None:
                m.dynamic_threshold = saved[name]
            else:
                saved.setdefault(name, m.dynamic_threshold)
                m.dynamic_threshold = value


@torch.no_grad()
def token_type_report(
    float_fn: Callable[[torch.Tensor], torch.Tensor],
    quant_model: nn.Module,
    ids: torch.Tensor,
    types: torch.Tensor,
    policies: tuple[str, ...] = POLICIES,
) -> list[PolicyFidelity]:
    """Per policy, KL / top-1 per token type over one tagged sequence `ids` [T] (one window)."""
    from lagoon.quant.linear import QuantizedLinear
    from lagoon.quant.policy import TokenType

    ids, types = ids.reshape(1, -1), types.reshape(-1).to(torch.int64)
    ref = float_fn(ids)[0]  # [T, V]
    lins = [m for m in quant_model.modules() if isinstance(m, QuantizedLinear) and m.scheme.activation_quantized]
    out = []
    for policy in policies:
        if policy not in POLICIES:
            raise ValueError(f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
        saved: dict[str, float] = {}
        tags: torch.Tensor | None = types
        if policy == "all-static":
            tags = torch.where(types == TokenType.REASONING, torch.full_like(types, int(TokenType.CONTEXT)), types)
            _set_threshold(quant_model, math.inf, saved)
        elif policy == "all-dynamic":
            tags = None
        before = sum(m.dynamic_tokens for m in lins)
        try:
            with token_types(tags):
                q = logits_of(quant_model)(ids)[0]
        finally:
            if saved:
                _set_threshold(quant_model, None, saved)
        dyn = sum(m.dynamic_tokens for m in lins) - before
        frac = dyn / (len(lins) * ids.shape[1]) if lins else math.nan
        out.append(PolicyFidelity(policy, typed_fidelity(ref, q, types), frac))
    return out
